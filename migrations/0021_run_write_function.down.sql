drop function sparkops_tool_scope(uuid, uuid, uuid);
drop function sparkops_policies_in_scope(uuid, uuid, uuid);
drop function sparkops_run_write(uuid, text, boolean, jsonb, boolean, text, bigint, text, uuid,
    text, jsonb, jsonb, jsonb, bigint, float8, jsonb, boolean, jsonb, jsonb, jsonb, jsonb);
drop function sparkops_run_event_data(uuid, uuid, uuid, integer, uuid, text, text, jsonb, jsonb,
    bigint, bigint, numeric);
drop function sparkops_webhook_payload(text, jsonb);
drop function sparkops_webhooks_told(uuid, text);
