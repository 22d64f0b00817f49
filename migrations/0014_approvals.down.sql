drop table run_step_approvals;
