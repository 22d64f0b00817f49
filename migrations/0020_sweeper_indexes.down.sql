drop index run_steps_held_idx;
drop index runs_unsettled_idx;
drop index runs_deadline_idx;
