-- Reservations in flight: a model call's worst-case cost held against a budget window until
-- the call settles. If the host dies between the two, the sweeper releases the hold once it
-- expires, so a lost call never keeps budget reserved for ever.
create table budget_reservations (
    reservation_id uuid not null,
    policy_id uuid not null references policies (policy_id) on delete cascade,
    window_start timestamptz not null,
    amount_usd numeric(20, 6) not null,
    expires_at timestamptz not null,
    primary key (reservation_id, policy_id)
);
create index budget_reservations_expiry_idx on budget_reservations (expires_at);
