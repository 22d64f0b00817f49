-- Pausing runs: a paused run starts no new step (running ones finish and are recorded), its
-- timeouts stop counting (resume moves its deadline and its approvals' deadlines on by the
-- time it was paused), and it still holds its concurrency slot.
alter table runs drop constraint runs_status_check;
alter table runs add constraint runs_status_check check (status in
    ('queued', 'running', 'waiting', 'paused', 'succeeded', 'failed', 'timed_out', 'cancelling', 'cancelled'));
alter table runs add column paused_at timestamptz;
drop index runs_active_idx;
create index runs_active_idx on runs (project_id, status)
    where status in ('queued', 'running', 'waiting', 'paused', 'cancelling');
