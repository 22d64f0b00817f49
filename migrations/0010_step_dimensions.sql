-- What the metrics group steps by: an agent step's agent and model, a tool step's tool.
-- Set when the run is created (agent, tool, from the pinned definition) and when the model
-- is called (model). Indexes keep the per-project, per-time-range aggregates fast.
alter table run_steps add column agent_id uuid;
alter table run_steps add column tool_id uuid;
alter table run_steps add column model text;
create index runs_project_created_idx on runs (project_id, created_at);
