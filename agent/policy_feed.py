"""What the policy writer should program for one node, from the shared cache: the compiled policy (agent.calc.policy)
merged with natOutgoing (agent.calc.nat). ``PolicyFeed.desired`` is the ``PolicySyncer``'s callback; it also keeps
the latest verdict on every policy (``statuses``, ``rejected``) for the agent's status and metrics.

A policy whose rules the kernel refused is compiled to allow nothing until it changes (``refused``: the syncer's
current refusals).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

from agent.cache import Cache
from agent.calc.nat import merged, nat_state
from agent.calc.policy import PolicyCompiler, PolicyStatus, compile_node
from agent.calc.policy.chains import policy_chain
from agent.calc.policy.spec import EGRESS, INGRESS
from agent.calc.state import Chain, DataplaneState
from agent.dataplane.policy_syncer import Desired

log = logging.getLogger(__name__)

# Test hook: PODNET_TEST_MISSING_MATCH=sctp makes the writer behave as on a kernel without the sctp match (xt_sctp,
# an optional module some kernels lack): each rule using it is written with the ipvs match instead, which this
# kernel does lack, so the kernel refuses exactly the rules such a kernel would. Nothing else is altered.
MISSING_MATCH_ENV = "PODNET_TEST_MISSING_MATCH"


class RejectedLog:
    """Logs a policy's rejection when it starts or its reason changes, and when it ends: not on every sync."""

    def __init__(self) -> None:
        self.current: dict[tuple[str, str], str] = {}

    def update(self, statuses: Mapping[tuple[str, str], PolicyStatus]) -> None:
        now = {key: s.reason for key, s in statuses.items() if not s.accepted}
        for key, reason in sorted(now.items()):
            if self.current.get(key) != reason:
                log.warning("policy %s/%s rejected: %s", key[0], key[1], reason)
        for key in sorted(set(self.current) - set(now)):
            log.info("policy %s/%s no longer rejected", key[0], key[1])
        self.current = now


class PolicyChains:
    """Which policy a chain was compiled from (its ``pi-``/``pe-`` chains), for charging a kernel refusal to it."""

    def __init__(self) -> None:
        self._names: dict[str, tuple[str, str]] = {}  # policy ident -> its two chain names (hashing is not free)

    def source_of(self, idents: list[str]) -> Callable[[str], str | None]:
        def find(chain: str) -> str | None:
            if not chain.startswith(("podnet-pi-", "podnet-pe-")):
                return None
            for ident in idents:
                if ident not in self._names:
                    self._names[ident] = (policy_chain(ident, INGRESS), policy_chain(ident, EGRESS))
                if chain in self._names[ident]:
                    return ident
            return None

        return find


def simulate_missing_match(state: DataplaneState, match: str) -> DataplaneState:
    def alter(chain: Chain) -> Chain:
        rules = tuple(r.replace(f"-m {match} --dport ", "-m ipvs --vport ") for r in chain.rules)
        return chain if rules == chain.rules else Chain(chain.name, rules, chain.hashed)

    tables = {t: {n: alter(c) for n, c in chains.items()} for t, chains in state.tables.items()}
    return DataplaneState(state.ipsets, tables, state.jumps)


class PolicyFeed:
    """Used from the policy writer's thread only (the compiler is incremental and not thread-safe); the public
    attributes are replaced, never mutated, so other threads may read them."""

    def __init__(self, cache: Cache, node: str, refused: Callable[[], Mapping[str, str]]) -> None:
        self.cache = cache
        self.node = node
        self._refused = refused
        self._compiler = PolicyCompiler()  # incremental: a change costs what it touches
        self._rejected = RejectedLog()
        self._chains = PolicyChains()
        self._missing_match = os.environ.get(MISSING_MATCH_ENV)
        self.statuses: Mapping[tuple[str, str], PolicyStatus] = {}
        self.revision: int | None = None  # of the last state computed
        self.local_endpoints = 0

    @property
    def rejected(self) -> dict[str, str]:
        """``namespace/name`` -> why, for every policy not enforced as written (invalid, unreadable, refused)."""
        return {f"{ns}/{name}": s.reason for (ns, name), s in self.statuses.items() if not s.accepted}

    def desired(self) -> Desired | None:
        snap = self.cache.snapshot()
        if not snap.in_sync:
            return None
        result = compile_node(snap, self.node, self._compiler, refused=dict(self._refused()))
        self._rejected.update(result.statuses)
        self.statuses = result.statuses
        self.local_endpoints = len(snap.local_endpoints(self.node))
        state = merged(result.state, nat_state(snap, self.node))
        if self._missing_match:
            state = simulate_missing_match(state, self._missing_match)

        def version_of(ident: str) -> object:
            namespace, _, name = ident.partition("/")
            return snap.policies.get((namespace, name))

        idents = [f"{ns}/{name}" for ns, name in result.compiled.policies]
        self.revision = snap.revision
        return Desired(snap.revision, state, self._chains.source_of(idents), version_of)
