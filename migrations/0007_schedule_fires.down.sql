drop table schedule_fires;
