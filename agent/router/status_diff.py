"""What of a pass's outcome to hand the status reporter. Some fields move with every change anywhere (the datastore
revision, peers' prefix counts): writing each would cost one etcd write per node (per peer) on every event, the
cluster's busiest traffic. They are refreshed by the verifying passes (``refresh``, about every ``resync``
seconds); a real change (a route, a peer's state, a problem) is handed over at once."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from agent.dataplane.routes import RouteResult
from agent.status import StatusReporter
from bgp.plan import SpeakerIdentity
from bgp.session import PeerState
from datastore import model as m


class StatusDiff:
    def __init__(self, node: str, reporter: StatusReporter, publish_agent: bool) -> None:
        """``publish_agent=False``: the owner composes the agent's status key from ``agent_view``."""
        self.node = node
        self.reporter = reporter
        self.publish_agent = publish_agent
        self.agent_view: m.AgentStatus | None = None  # what the router would publish as the agent's status
        self._agent_published: m.AgentStatus | None = None  # what was last handed to the reporter
        self._peers_published: dict[str, m.BGPPeerStatus] = {}

    def not_ready(self, agent: m.AgentStatus) -> None:
        """The router cannot work (no datastore, no node record): say so at once."""
        self._agent_published = None
        self._offer_agent(agent)

    def publish(
        self,
        result: RouteResult | None,
        *,
        peers: Sequence[PeerState],
        ident: SpeakerIdentity | None,
        problems: list[str],
        revision: int,
        since: str,
        refresh: bool,
    ) -> None:
        """Hand over what changed; ``refresh`` (the verifying passes) also what is only counted."""
        statuses = {}
        for cidr, done in (result.programmed if result is not None else {}).items():
            st = done.route.status(self.node)
            statuses[cidr] = m.RouteStatus(
                st.node, st.cidr, st.type, st.via, done.dev, st.encapsulation, st.learned_from
            )
        self.reporter.offer_routes(statuses)
        peer_statuses = self.peer_statuses(peers, refresh)
        self.reporter.offer_peers(peer_statuses)
        self._peers_published = peer_statuses
        agent = m.AgentStatus(
            node=self.node,
            in_sync=True,
            revision=revision,
            router_id=None if ident is None else ident.router_id,
            as_number=None if ident is None else ident.as_number,
            since=since,
            problems=tuple(problems),
        )
        self.agent_view = agent
        last = self._agent_published
        if last is not None and not refresh and dataclasses.replace(last, revision=revision) == agent:
            return
        self._offer_agent(agent)
        self._agent_published = agent

    def peer_statuses(self, peers: Sequence[PeerState], refresh: bool) -> dict[str, m.BGPPeerStatus]:
        """A peer whose only change is its prefix counts keeps its last published record (unless ``refresh``);
        state changes are published at once."""
        current = {p.address: p.to_status(self.node) for p in peers}
        if refresh:
            return current
        last = self._peers_published
        out = {}
        for address, st in current.items():
            old = last.get(address)
            same = (
                old is not None
                and dataclasses.replace(old, prefixes_received=st.prefixes_received, prefixes_sent=st.prefixes_sent)
                == st
            )
            out[address] = old if same and old is not None else st
        return out

    def _offer_agent(self, agent: m.AgentStatus) -> None:
        self.agent_view = agent
        if self.publish_agent:
            self.reporter.offer_agent(agent)
