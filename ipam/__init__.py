"""IP address management in etcd: pools, blocks with node affinity, CAS allocation, release, GC."""
