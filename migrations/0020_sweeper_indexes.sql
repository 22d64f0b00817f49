-- The sweeper's tick reads what is due; each of its reads gets an index that holds only
-- the rows it can find, so a tick costs what is due, not how many runs wait. (With 186,000
-- runs waiting on approvals, three of its reads scanned them all: 62, 55 and 10 ms a tick.)
-- Built inside the migration's transaction, they hold off writes to their tables while they
-- build; on a large database create them first with `create index concurrently` and the
-- same definitions, and this migration keeps them (`if not exists`).

-- Runs past their deadline: only unfinished runs that have one.
create index if not exists runs_deadline_idx on runs (deadline_at)
    where status in ('queued', 'running', 'waiting') and deadline_at is not null;

-- Runs that may need deciding: cancelling, or started with nothing in flight.
create index if not exists runs_unsettled_idx on runs (status)
    where status in ('queued', 'running', 'cancelling');

-- Steps a budget holds until its window turns.
create index if not exists run_steps_held_idx on run_steps (run_id)
    where status = 'waiting' and hold ->> 'mode' = 'wait';
