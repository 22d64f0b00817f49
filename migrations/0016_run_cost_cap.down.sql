drop table run_cost_reservations;
alter table runs drop column reserved_usd, drop column max_cost_usd;
