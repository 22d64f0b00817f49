alter table runs drop column trigger_id;
drop table triggers;
drop table webhook_deliveries;
drop table signing_secrets;
drop table webhooks;
drop function sparkops_uuid_v7();
