drop table trace_exports;
alter table projects drop column trace_endpoint;
