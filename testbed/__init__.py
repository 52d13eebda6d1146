"""Reusable test bed: a real etcd server, network-namespace nodes and pods, probes, leak checks.

Used by the tests and by podnet-lab; never by the agent, CNI or controller (an import-linter contract says so)."""
