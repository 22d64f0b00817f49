-- MCP servers as tools, agents that stream, and budgets that hold steps.
--
-- MCP servers: a project's Streamable HTTP endpoints, their headers (literals or
-- `{{ secret.NAME }}` references, resolved at call time), the tool names agents may call,
-- and the last `tools/list` answer (cached; refreshed on request).
create table mcp_servers (
    mcp_server_id uuid primary key,
    project_id uuid not null references projects (project_id) on delete cascade,
    name text not null check (name ~ '^[a-z][a-z0-9_-]{0,63}$'),
    description text check (length(description) <= 2000),
    url text not null check (length(url) between 1 and 2048),
    headers jsonb not null default '{}'::jsonb,
    allowed_tools jsonb not null check (jsonb_typeof(allowed_tools) = 'array'),
    timeout_ms integer not null default 30000 check (timeout_ms between 100 and 300000),
    -- The last listing: `[{name, description, input_schema}]`, null until listed.
    tools jsonb,
    tools_listed_at timestamptz,
    protocol_version text,
    server_info jsonb,
    version integer not null default 1,
    deleted_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create unique index mcp_servers_project_name_key on mcp_servers (project_id, name) where deleted_at is null;
create index mcp_servers_project_idx on mcp_servers (project_id, mcp_server_id desc);

-- An agent's MCP tools, as `mcp:<server>/<tool>` names, in the order offered.
alter table agents add column mcp_tools jsonb not null default '[]'::jsonb
    check (jsonb_typeof(mcp_tools) = 'array' and jsonb_array_length(mcp_tools) <= 64);

-- Agents whose model calls stream their answers (`step.delta` events while they come).
alter table agents add column stream boolean not null default false;

-- Budgets that hold rather than fail: a step a blocking budget refused with
-- `on_exhausted: wait | ask` waits with its hold (the budget, the call's estimate, when the
-- window turns, and the agent's checkpoint to go on from).
alter table run_steps add column hold jsonb;

-- The price of the estimated tokens of a run's calls whose provider reported no usage
-- (recorded as unpriced): the run's own max_cost_usd counts it as spent.
alter table runs add column estimated_usd numeric(20, 6) not null default 0;
