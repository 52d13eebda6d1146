"""podnet-cni: the CNI 1.0 plugin (veth, /32 route, proxy-ARP gateway, IPAM, workload endpoint)."""
