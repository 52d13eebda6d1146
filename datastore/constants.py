"""Constants shared by every podnet component that touches the kernel (agent, cni). Pure: no I/O."""

from __future__ import annotations

# The routing protocol number on every route podnet installs (agent and CNI alike). The agent removes only routes
# carrying it, so routes made by anyone else are never touched. 80 is unassigned in iproute2's rt_protos.
ROUTE_PROTO = 80
