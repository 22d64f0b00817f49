drop table run_events;
drop table run_steps;
drop table runs;
