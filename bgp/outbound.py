"""What this node sends to each peer: its own prefixes, and — when it is a route reflector — the routes it
reflects between podnet nodes (RFC 4456). Pure.

ExaBGP does not route: a podnet reflector receives its clients' routes through the API and announces them again,
per peer, with ORIGINATOR_ID (the router that first announced the route) and CLUSTER_LIST (our cluster ID
prepended) set and the next hop unchanged. A route learned from a client goes to every other client and to the
other reflectors; one learned from another reflector goes to clients only; none goes back to its originator.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from bgp import aspath
from bgp.commands import OutRoute
from bgp.plan import PeerSpec, SpeakerIdentity
from bgp.rib import LearnedRoute, Rib, preference

AS_LOOP = "as-loop"
POLICY = "policy"
REFLECTION_LOOP = "reflection-loop"
AS_ZERO = "as-zero"


def refusal(identity: SpeakerIdentity, peer: PeerSpec, route: LearnedRoute) -> str | None:
    """Why a route received from ``peer`` may not enter the RIB (None: it may): our import policy, our own AS on
    its AS_PATH (RFC 4271 section 9.1.2), AS 0 on it (RFC 7607), or our own router ID or cluster ID on it (RFC
    4456 loop prevention)."""
    if not peer.accept_routes:
        return POLICY
    if identity.as_number in aspath.asns(route.as_path):
        return AS_LOOP
    if 0 in aspath.asns(route.as_path):
        return AS_ZERO
    if route.originator_id == identity.router_id:
        return REFLECTION_LOOP
    if identity.cluster_id is not None and identity.cluster_id in route.cluster_list:
        return REFLECTION_LOOP
    return None


def accepts(identity: SpeakerIdentity, peer: PeerSpec, route: LearnedRoute) -> bool:
    """Whether a route received from ``peer`` may enter the RIB."""
    return refusal(identity, peer, route) is None


def outbound(
    identity: SpeakerIdentity,
    peers: Iterable[PeerSpec],
    own: Iterable[str],
    rib: Rib,
    router_ids: Mapping[str, str],
) -> dict[str, dict[str, OutRoute]]:
    """peer address -> prefix -> route to send. ``router_ids`` maps a peer address to the router ID in its OPEN."""
    usable = [p for p in peers if p.ok]
    own_set = frozenset(own)
    out: dict[str, dict[str, OutRoute]] = {p.address: {} for p in usable}
    for peer in usable:
        for prefix in own_set:
            out[peer.address][prefix] = OutRoute(prefix, identity.local_address)
    if identity.cluster_id is None:
        return out

    ibgp = [p for p in usable if p.in_cluster and p.as_number == identity.as_number]
    by_address = {p.address: p for p in ibgp}
    for prefix, route in _best_cluster_routes(rib, by_address).items():
        if prefix in own_set:
            continue
        source = by_address[route.peer]
        originator = route.originator_id or router_ids.get(source.address, source.address)
        sent = OutRoute(
            prefix=prefix,
            next_hop=route.next_hop,
            local_pref=route.local_pref,
            as_path=route.as_path,
            originator_id=originator,
            cluster_list=(identity.cluster_id, *route.cluster_list),
        )
        for target in ibgp:
            if target.address == source.address:
                continue
            if router_ids.get(target.address, target.address) == originator:
                continue
            if not source.rr_client and not target.rr_client:
                continue  # non-client to non-client: that peer has it from its own sessions
            out[target.address][prefix] = sent
    return out


def _best_cluster_routes(rib: Rib, sources: Mapping[str, PeerSpec]) -> dict[str, LearnedRoute]:
    """Per prefix, the best route among those learned from podnet iBGP peers (what a reflector reflects)."""
    best: dict[str, LearnedRoute] = {}
    for address in sources:
        for prefix, route in rib.routes_from(address).items():
            current = best.get(prefix)
            if current is None or preference(route) < preference(current):
                best[prefix] = route
    return best
