drop table budget_reservations;
