-- What became of each fire time of a schedule (API.md "Schedules", DESIGN.md section 5): a
-- run started, or the reason none did. A fire time is never silently lost: the scheduler
-- records every one it passes, collapsing a stretch of fires missed beyond the catch-up
-- window into one row (`missed_until`, `missed_count`). Manual triggers are recorded too.
create table schedule_fires (
    schedule_id uuid not null references schedules (schedule_id) on delete cascade,
    fire_at timestamptz not null,
    outcome text not null check (outcome in ('started', 'skipped', 'refused', 'failed')),
    reason text,
    run_id uuid references runs (run_id) on delete set null,
    manual boolean not null default false,
    missed_until timestamptz,
    missed_count integer not null default 1,
    recorded_at timestamptz not null default now(),
    primary key (schedule_id, fire_at)
);
