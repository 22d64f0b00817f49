-- Agent metadata, and the default model price table (USD per million tokens). A project
-- overrides a price with its own row; `GET /models/prices` shows which applies.

alter table agents add column metadata jsonb;

insert into model_prices (model_price_id, project_id, model, input_per_mtok, output_per_mtok) values
    (gen_random_uuid(), null, 'openai/gpt-4o', 2.50, 10.00),
    (gen_random_uuid(), null, 'openai/gpt-4o-mini', 0.15, 0.60),
    (gen_random_uuid(), null, 'openai/gpt-4.1', 2.00, 8.00),
    (gen_random_uuid(), null, 'openai/gpt-4.1-mini', 0.40, 1.60),
    (gen_random_uuid(), null, 'openai/gpt-4.1-nano', 0.10, 0.40),
    (gen_random_uuid(), null, 'openai/o3-mini', 1.10, 4.40),
    (gen_random_uuid(), null, 'anthropic/claude-3-5-haiku-latest', 0.80, 4.00),
    (gen_random_uuid(), null, 'anthropic/claude-3-7-sonnet-latest', 3.00, 15.00),
    (gen_random_uuid(), null, 'anthropic/claude-sonnet-4-0', 3.00, 15.00),
    (gen_random_uuid(), null, 'anthropic/claude-opus-4-0', 15.00, 75.00),
    (gen_random_uuid(), null, 'google/gemini-2.0-flash', 0.10, 0.40),
    (gen_random_uuid(), null, 'google/gemini-1.5-pro', 1.25, 5.00),
    (gen_random_uuid(), null, 'mistral/mistral-large-latest', 2.00, 6.00),
    (gen_random_uuid(), null, 'mistral/mistral-small-latest', 0.20, 0.60);
