-- Budgets (DESIGN.md section 5, money reserved before it is spent): each budget rule of a
-- policy has one row per window (`window_start` = the window's first instant, UTC;
-- '-infinity' for `total`). Before a model call the engine reserves the call's worst-case
-- cost against every budget in scope with one conditional update per row
-- (`spent + reserved + cost <= limit`), and settles to the real cost after, so concurrent
-- steps never push a blocking budget past its limit.
create table budget_usage (
    policy_id uuid not null references policies (policy_id) on delete cascade,
    window_start timestamptz not null,
    spent_usd numeric(20, 6) not null default 0 check (spent_usd >= 0),
    reserved_usd numeric(20, 6) not null default 0 check (reserved_usd >= 0),
    tokens bigint not null default 0,
    calls bigint not null default 0,
    updated_at timestamptz not null default now(),
    primary key (policy_id, window_start)
);
