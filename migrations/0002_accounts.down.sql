drop table idempotency_keys;
drop table api_keys;
drop table memberships;
drop table projects;
drop table refresh_tokens;
drop table refresh_token_families;
drop table users;
