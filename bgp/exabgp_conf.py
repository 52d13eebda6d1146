"""ExaBGP configuration text for one node's speaker. Pure: the speaker writes the file and (re)loads it.

Routes are never written here: they go through the API so that a reload only changes sessions, and so that after
a restart our End-of-RIB (``manual-eor``) is sent only once the whole announcement set is back in ExaBGP — the
peers keep our stale routes until then (graceful restart, no flap).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from pathlib import Path

from bgp.plan import PeerSpec, SpeakerIdentity

PROCESS = "podnet-bridge"


def bridge_command(python: str, socket_path: Path) -> str:
    return f"{python} -m bgp.bridge {socket_path}"


def render(identity: SpeakerIdentity, peers: Iterable[PeerSpec], bridge: str) -> str:
    """The configuration for ``peers`` (those with an error are left out)."""
    if any(c in bridge for c in ";{}\n"):
        raise ValueError(f"bridge command {bridge!r} contains characters ExaBGP's parser splits on")
    lines = [f"process {PROCESS} {{", f"    run {bridge};", "    encoder json;", "}", ""]
    for peer in peers:
        if peer.ok:
            lines.extend(_neighbor(identity, peer))
    return "\n".join(lines) + "\n"


def _neighbor(identity: SpeakerIdentity, peer: PeerSpec) -> list[str]:
    out = [
        f"neighbor {peer.address} {{",
        f"    router-id {identity.router_id};",
        f"    local-address {identity.local_address};",
        f"    local-as {identity.as_number};",
        f"    peer-as {peer.as_number};",
        f"    hold-time {peer.hold_time};",
        f"    passive {'true' if peer.passive else 'false'};",
        "    manual-eor true;",
        "    group-updates false;",
    ]
    if peer.password is not None:
        # base64 keeps any byte of the key out of reach of the configuration parser's quoting rules
        encoded = base64.b64encode(peer.password.encode()).decode()
        out += [f'    md5-password "{encoded}";', "    md5-base64 true;"]
    caps = ["route-refresh;"]
    if peer.graceful_restart_time > 0:
        caps.insert(0, f"graceful-restart {peer.graceful_restart_time};")
    out += [
        "    family { ipv4 unicast; }",
        f"    capability {{ {' '.join(caps)} }}",
        "    api {",
        f"        processes [ {PROCESS} ];",
        "        neighbor-changes;",
        "        receive { parsed; update; open; notification; }",
        "    }",
        "}",
        "",
    ]
    return out
