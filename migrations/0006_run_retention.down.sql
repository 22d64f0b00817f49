drop index runs_prunable_idx;
alter table runs drop column payloads_pruned_at;
