-- Runs, their steps and their event logs (DESIGN.md section 5). Postgres is the truth: a
-- step is claimed by a conditional update with a lease, its result and an event are written
-- in one transaction, and the event log is ordered per run by `seq` (allocated under the
-- run's row lock, so a reader resuming after `seq` never misses one that commits later).

create table runs (
    run_id uuid primary key,
    project_id uuid not null references projects (project_id) on delete cascade,
    workflow_id uuid not null references workflows (workflow_id),
    workflow_version integer not null,
    status text not null default 'queued' check (status in
        ('queued', 'running', 'waiting', 'succeeded', 'failed', 'timed_out', 'cancelling', 'cancelled')),
    input jsonb not null,
    output jsonb,
    error jsonb,
    retry_of uuid references runs (run_id),
    schedule_id uuid references schedules (schedule_id),
    scheduled_for timestamptz,
    created_by uuid references users (user_id),
    deadline_at timestamptz,
    event_seq integer not null default 0,
    tokens_in bigint not null default 0,
    tokens_out bigint not null default 0,
    cost_usd numeric(20, 6) not null default 0,
    unpriced_calls integer not null default 0,
    started_at timestamptz,
    finished_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    foreign key (workflow_id, workflow_version) references workflow_versions (workflow_id, version)
);
create index runs_project_idx on runs (project_id, run_id desc);
create index runs_workflow_idx on runs (workflow_id, run_id desc);
-- The sweeper's and the concurrency limit's scan: runs not finished.
create index runs_active_idx on runs (project_id, status)
    where status in ('queued', 'running', 'waiting', 'cancelling');
-- Each fire time of a schedule makes at most one run.
create unique index runs_schedule_fire_key on runs (schedule_id, scheduled_for) where schedule_id is not null;

create table run_steps (
    run_id uuid not null references runs (run_id) on delete cascade,
    step_key text not null,
    kind text not null check (kind in ('agent', 'tool', 'condition', 'approval')),
    status text not null default 'pending' check (status in
        ('pending', 'ready', 'running', 'retrying', 'waiting', 'succeeded', 'failed', 'skipped', 'cancelled')),
    attempt integer not null default 0,
    input jsonb,
    output jsonb,
    error jsonb,
    -- The claim of the attempt running now: who holds it and until when.
    lease_id uuid,
    lease_expires_at timestamptz,
    next_attempt_at timestamptz,
    deadline_at timestamptz,
    tokens_in bigint not null default 0,
    tokens_out bigint not null default 0,
    cost_usd numeric(20, 6),
    started_at timestamptz,
    finished_at timestamptz,
    duration_ms bigint,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    primary key (run_id, step_key)
);
create index run_steps_ready_idx on run_steps (run_id) where status = 'ready';
create index run_steps_lease_idx on run_steps (lease_expires_at) where status = 'running';
create index run_steps_retry_idx on run_steps (next_attempt_at) where status = 'retrying';
create index run_steps_waiting_idx on run_steps (deadline_at) where status = 'waiting';

create table run_events (
    run_id uuid not null references runs (run_id) on delete cascade,
    seq integer not null,
    kind text not null,
    step_key text,
    data jsonb not null default '{}'::jsonb,
    created_at timestamptz not null default now(),
    primary key (run_id, seq)
);
