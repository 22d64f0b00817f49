alter table runs reset (fillfactor);
