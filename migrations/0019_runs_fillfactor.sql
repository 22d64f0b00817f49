-- A run's row is updated for every event of the run (its `event_seq`); with room left on
-- its page such an update is heap-only (no new entry in any of the table's indexes). New
-- pages keep a fifth free; existing ones are unchanged until rewritten.
alter table runs set (fillfactor = 80);
