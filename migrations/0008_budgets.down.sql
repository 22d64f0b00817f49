drop table budget_usage;
