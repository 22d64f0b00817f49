-- The first migration: what readiness needs, and the conventions every later table follows
-- (lowercase SQL, `<table>_id` keys, `created_at`/`updated_at` as timestamptz).
create table service_probe (
    service_probe_id integer primary key check (service_probe_id = 1),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

insert into service_probe (service_probe_id) values (1);
