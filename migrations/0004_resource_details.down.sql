-- The default prices this migration added (a project's own prices stay).
delete from model_prices
where project_id is null
  and model in (
    'openai/gpt-4o', 'openai/gpt-4o-mini', 'openai/gpt-4.1', 'openai/gpt-4.1-mini',
    'openai/gpt-4.1-nano', 'openai/o3-mini', 'anthropic/claude-3-5-haiku-latest',
    'anthropic/claude-3-7-sonnet-latest', 'anthropic/claude-sonnet-4-0',
    'anthropic/claude-opus-4-0', 'google/gemini-2.0-flash', 'google/gemini-1.5-pro',
    'mistral/mistral-large-latest', 'mistral/mistral-small-latest'
  );
alter table agents drop column metadata;
