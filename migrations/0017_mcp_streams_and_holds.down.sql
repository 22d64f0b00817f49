alter table runs drop column estimated_usd;
alter table run_steps drop column hold;
alter table agents drop column stream;
alter table agents drop column mcp_tools;
drop table mcp_servers;
