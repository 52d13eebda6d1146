"""The only writers of the node's iptables, ipsets, routes, links and sysctls."""
