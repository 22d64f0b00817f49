-- Project resources: agents, tools, workflows (with every saved definition), policies,
-- schedules, model prices and project secrets. Rows are soft-deleted (`deleted_at`) so that
-- runs and workflow versions that refer to them keep their history.

create table tools (
    tool_id uuid primary key,
    project_id uuid not null references projects (project_id) on delete cascade,
    name text not null check (length(name) between 1 and 200),
    description text check (length(description) <= 2000),
    method text not null default 'POST' check (method in ('GET', 'POST', 'PUT', 'PATCH', 'DELETE')),
    url text not null check (length(url) between 1 and 2048),
    -- Header values; `{{ secret.NAME }}` references are stored as written, never resolved here.
    headers jsonb not null default '{}'::jsonb,
    input_schema jsonb not null default '{"type": "object"}'::jsonb,
    output_schema jsonb,
    timeout_ms integer not null default 30000 check (timeout_ms between 1 and 600000),
    max_response_bytes integer not null default 1048576 check (max_response_bytes between 1 and 16777216),
    version integer not null default 1,
    deleted_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create unique index tools_project_name_key on tools (project_id, name) where deleted_at is null;
create index tools_project_idx on tools (project_id, tool_id desc);

create table agents (
    agent_id uuid primary key,
    project_id uuid not null references projects (project_id) on delete cascade,
    name text not null check (length(name) between 1 and 200),
    description text check (length(description) <= 2000),
    -- `provider/model`, e.g. `openai/gpt-4o-mini`.
    model text not null check (model ~ '^[a-z0-9_-]+/[A-Za-z0-9._:-]+$'),
    system_prompt text not null default '' check (length(system_prompt) <= 100000),
    max_iterations integer not null default 8 check (max_iterations between 1 and 100),
    max_tokens integer not null default 1024 check (max_tokens between 1 and 200000),
    temperature numeric check (temperature between 0 and 2),
    response_format jsonb,
    version integer not null default 1,
    deleted_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create unique index agents_project_name_key on agents (project_id, name) where deleted_at is null;
create index agents_project_idx on agents (project_id, agent_id desc);

-- The tools an agent may call, in the order it offers them.
create table agent_tools (
    agent_id uuid not null references agents (agent_id) on delete cascade,
    tool_id uuid not null references tools (tool_id),
    position integer not null,
    primary key (agent_id, tool_id)
);

create table workflows (
    workflow_id uuid primary key,
    project_id uuid not null references projects (project_id) on delete cascade,
    name text not null check (length(name) between 1 and 200),
    description text check (length(description) <= 2000),
    -- The version new runs use: the latest in workflow_versions.
    version integer not null default 1,
    timeout_s integer check (timeout_s between 1 and 2592000),
    deleted_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create unique index workflows_project_name_key on workflows (project_id, name) where deleted_at is null;
create index workflows_project_idx on workflows (project_id, workflow_id desc);

-- Every saved definition; a run pins the version it started with.
create table workflow_versions (
    workflow_id uuid not null references workflows (workflow_id) on delete cascade,
    version integer not null check (version >= 1),
    definition jsonb not null,
    input_schema jsonb,
    created_by uuid references users (user_id),
    created_at timestamptz not null default now(),
    primary key (workflow_id, version)
);

create table policies (
    policy_id uuid primary key,
    project_id uuid not null references projects (project_id) on delete cascade,
    name text not null check (length(name) between 1 and 200),
    enabled boolean not null default true,
    scope_agent_id uuid references agents (agent_id),
    scope_workflow_id uuid references workflows (workflow_id),
    rules jsonb not null,
    version integer not null default 1,
    deleted_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    check (scope_agent_id is null or scope_workflow_id is null)
);
create index policies_project_idx on policies (project_id, policy_id desc);

create table schedules (
    schedule_id uuid primary key,
    project_id uuid not null references projects (project_id) on delete cascade,
    workflow_id uuid not null references workflows (workflow_id),
    cron text not null check (length(cron) between 9 and 200),
    timezone text not null default 'UTC',
    input jsonb not null default '{}'::jsonb,
    enabled boolean not null default true,
    overlap text not null default 'skip' check (overlap in ('skip', 'allow', 'cancel_previous')),
    catchup_window_s integer not null default 0 check (catchup_window_s between 0 and 2592000),
    next_fire_at timestamptz,
    last_fired_at timestamptz,
    version integer not null default 1,
    deleted_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index schedules_project_idx on schedules (project_id, schedule_id desc);
-- The scheduler's scan: enabled schedules by next fire time.
create index schedules_due_idx on schedules (next_fire_at) where enabled and deleted_at is null;

-- Prices in USD per million tokens; `project_id` null is the default table.
create table model_prices (
    model_price_id uuid primary key,
    project_id uuid references projects (project_id) on delete cascade,
    model text not null,
    input_per_mtok numeric(20, 6) not null check (input_per_mtok >= 0),
    output_per_mtok numeric(20, 6) not null check (output_per_mtok >= 0),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create unique index model_prices_default_key on model_prices (model) where project_id is null;
create unique index model_prices_project_key on model_prices (project_id, model) where project_id is not null;

-- Write-only secrets: AES-256-GCM under a master key named by key_id, the project id as
-- associated data. Values never leave the database in clear through any route.
create table project_secrets (
    project_id uuid not null references projects (project_id) on delete cascade,
    name text not null check (name ~ '^[A-Za-z][A-Za-z0-9_.-]{0,127}$'),
    ciphertext bytea not null,
    nonce bytea not null check (length(nonce) = 12),
    key_id text not null,
    version integer not null default 1,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    primary key (project_id, name)
);
