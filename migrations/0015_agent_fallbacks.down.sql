alter table agents drop column fallback_models;
