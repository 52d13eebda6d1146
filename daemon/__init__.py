"""The node daemon (``podnet-agent``): composition of the agent's components, their supervisor, configuration and
the health / readiness / metrics endpoints. The layer above ``agent`` and ``cni``."""
