"""podnet-agent: per-node daemon (watch etcd, compute desired state, program the kernel, steer BGP)."""
