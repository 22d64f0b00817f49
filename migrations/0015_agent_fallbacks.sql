-- Model fallbacks: models an agent moves to, in order, when its model's provider fails
-- (an error, a rate limit, a context-length refusal), under the same policies and budgets.
alter table agents add column fallback_models jsonb not null default '[]'::jsonb
    check (jsonb_typeof(fallback_models) = 'array' and jsonb_array_length(fallback_models) <= 5);
