-- Trace export (OTLP/HTTP JSON, e.g. LangWatch): a project names its collector; every run it
-- finishes gets a row here in the same transaction (the outbox), and the `exporter` cron
-- component sends it off the run's critical path, retrying with backoff.
alter table projects add column trace_endpoint text check (length(trace_endpoint) <= 2000);

create table trace_exports (
    run_id uuid primary key references runs (run_id) on delete cascade,
    project_id uuid not null references projects (project_id) on delete cascade,
    status text not null default 'pending' check (status in ('pending', 'exported', 'failed')),
    attempts integer not null default 0,
    -- When the next attempt may start; while one is in flight, the end of its lease.
    next_attempt_at timestamptz not null default now(),
    last_error text,
    exported_at timestamptz,
    created_at timestamptz not null default now()
);
create index trace_exports_due_idx on trace_exports (next_attempt_at) where status = 'pending';
