-- Retention of step payloads (DESIGN.md section 5, the sweeper): a finished run older than
-- the `step_payload_retention_days` variable has its steps' inputs and outputs removed, and
-- is marked so each run is pruned once. The run itself, its totals, its steps' statuses,
-- timings and errors, and its event log stay.
alter table runs add column payloads_pruned_at timestamptz;
create index runs_prunable_idx on runs (finished_at)
    where finished_at is not null and payloads_pruned_at is null;
