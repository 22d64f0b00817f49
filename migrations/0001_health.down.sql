drop table service_probe;
