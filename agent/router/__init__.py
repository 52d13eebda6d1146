"""The node's router: route calculation, the link and route writers, the BGP speaker and their status, driven by
one loop (``loop.Router``). ``podnet-agent`` hosts it as its router component; ``python -m agent.router`` runs it
alone (tests, the lab's old mode, benchmarks), one per node namespace, several on one machine.

- ``config``: ``RouterConfig``;
- ``loop``: ``Router``, the loop and one pass;
- ``bgp_latch``: when BGP counts as caught up after a start (learned routes missing from the RIB are then real
  withdrawals) and BGP readiness;
- ``status_diff``: what of a pass's outcome to hand the status reporter (only what changed);
- ``cli``: the command line.
"""
