"""podnet-lab: a multi-node cluster in network namespaces on one machine, with a scenario runner."""
