"""What vbdctl does with instances: attach, Xen config, transfer, failover."""
