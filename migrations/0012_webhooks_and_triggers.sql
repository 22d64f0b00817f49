-- Outgoing webhooks (Standard Webhooks): a project's endpoints, the secrets they are signed
-- with, and the outbox of deliveries. A delivery row is written in the same transaction as
-- the event it tells of (`sparkops_engine::outbox`), and the `notifier` cron component
-- sends it off every run's critical path, retrying with backoff.
-- A time-ordered UUID (version 7 layout) made in SQL, for rows the database makes (Postgres
-- 15 has none built in): delivery ids sort by creation, so the history pages by id.
create function sparkops_uuid_v7() returns uuid language sql volatile as $$
    select (lpad(to_hex((extract(epoch from clock_timestamp()) * 1000)::bigint), 12, '0')
        || '7' || substr(md5(random()::text), 1, 3)
        || to_hex(8 + floor(random() * 4)::int) || substr(md5(random()::text), 1, 15))::uuid
$$;

create table webhooks (
    webhook_id uuid primary key,
    project_id uuid not null references projects (project_id) on delete cascade,
    url text not null check (length(url) <= 2048),
    description text check (length(description) <= 1000),
    event_types text[] not null check (cardinality(event_types) between 1 and 32),
    enabled boolean not null default true,
    -- Why the webhook was disabled by the notifier (failing for too long); null otherwise.
    disabled_reason text,
    -- The first failed attempt since the last delivered one.
    failing_since timestamptz,
    version integer not null default 1,
    created_by uuid references users (user_id) on delete set null,
    deleted_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index webhooks_project_idx on webhooks (project_id) where deleted_at is null;

-- Secrets that sign (webhooks) or verify (triggers), sealed with the master key like project
-- secrets (associated data: the owner's id). The newest row with no `expires_at` is current;
-- a rotated one keeps signing until its `expires_at`, so receivers can switch over.
create table signing_secrets (
    owner_id uuid not null,
    project_id uuid not null references projects (project_id) on delete cascade,
    seq integer not null,
    ciphertext bytea not null,
    nonce bytea not null,
    key_id text not null,
    expires_at timestamptz,
    created_at timestamptz not null default now(),
    primary key (owner_id, seq)
);

create table webhook_deliveries (
    delivery_id uuid primary key,
    webhook_id uuid not null references webhooks (webhook_id) on delete cascade,
    project_id uuid not null references projects (project_id) on delete cascade,
    event_type text not null,
    -- The event as sent (`type`, `timestamp`, `data`): the same bytes on every attempt.
    payload jsonb not null,
    status text not null default 'pending' check (status in ('pending', 'delivered', 'failed')),
    attempts integer not null default 0,
    -- When the next attempt may start; while one is in flight, the end of its lease.
    next_attempt_at timestamptz not null default now(),
    last_response_status integer,
    last_error text,
    last_attempt_at timestamptz,
    delivered_at timestamptz,
    created_at timestamptz not null default now()
);
create index webhook_deliveries_due_idx on webhook_deliveries (next_attempt_at) where status = 'pending';
create index webhook_deliveries_history_idx on webhook_deliveries (webhook_id, created_at desc, delivery_id desc);

-- Event triggers: `POST /hooks/{trigger_id}` verifies the sender (its signature is the
-- auth), renders the workflow's input from the request and starts a run through the same
-- path as `POST /runs`. A refused request records nothing but these counters.
create table triggers (
    trigger_id uuid primary key,
    project_id uuid not null references projects (project_id) on delete cascade,
    name text not null check (length(name) between 1 and 200),
    workflow_id uuid not null references workflows (workflow_id),
    input_template jsonb not null,
    verification text not null check (verification in ('standard_webhooks', 'github', 'bearer')),
    enabled boolean not null default true,
    refused_count bigint not null default 0,
    last_refused_at timestamptz,
    last_refusal text,
    version integer not null default 1,
    created_by uuid references users (user_id) on delete set null,
    deleted_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index triggers_project_idx on triggers (project_id, trigger_id desc);

alter table runs add column trigger_id uuid references triggers (trigger_id);
create index runs_trigger_idx on runs (trigger_id, run_id desc) where trigger_id is not null;
