-- A run's own hard budget (`POST /runs {max_cost_usd}`), held like a blocking policy budget
-- call by call: a model call's worst-case cost is reserved against what the run has left
-- (max_cost_usd - cost_usd - reserved_usd) and settled to the real cost in the statement
-- that adds the call's cost to the run. A hold whose call never settled (its host died) is
-- released by the sweeper once it expires.
alter table runs
    add column max_cost_usd numeric(20, 6) check (max_cost_usd >= 0),
    add column reserved_usd numeric(20, 6) not null default 0;

create table run_cost_reservations (
    reservation_id uuid primary key,
    run_id uuid not null references runs (run_id) on delete cascade,
    amount_usd numeric(20, 6) not null,
    expires_at timestamptz not null
);
create index run_cost_reservations_expiry_idx on run_cost_reservations (expires_at);
