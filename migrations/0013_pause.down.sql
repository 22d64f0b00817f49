update runs set status = 'running', paused_at = null where status = 'paused';
drop index runs_active_idx;
create index runs_active_idx on runs (project_id, status)
    where status in ('queued', 'running', 'waiting', 'cancelling');
alter table runs drop column paused_at;
alter table runs drop constraint runs_status_check;
alter table runs add constraint runs_status_check check (status in
    ('queued', 'running', 'waiting', 'succeeded', 'failed', 'timed_out', 'cancelling', 'cancelled'));
