drop index runs_project_created_idx;
alter table run_steps drop column model;
alter table run_steps drop column tool_id;
alter table run_steps drop column agent_id;
