"""podnet-controller: Kubernetes → etcd sync and IPAM garbage collection."""
