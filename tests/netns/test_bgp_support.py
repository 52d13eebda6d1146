"""Shared pieces of the BGP netns tests (no tests here): podnet speakers, BIRD 2 and GoBGP daemons in node
namespaces, and readers of what each of them received."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bgp.plan import Defaults, SpeakerIdentity, identity
from bgp.speaker import Speaker, SpeakerConfig
from datastore import model as m
from testbed.netns import NetnsBed, NodeNs, Underlay
from testbed.procs import alive
from testbed.wait import eventually

AS = 64512
FAST = Defaults(hold_time=3, graceful_restart_time=10)


@dataclass
class Cluster:
    bed: NetnsBed
    underlay: Underlay
    hosts: dict[str, NodeNs]
    models: dict[str, m.Node]


def make_cluster(bed: NetnsBed, names_hosts: Iterable[tuple[str, int]], rr: Iterable[str] = ()) -> Cluster:
    underlay = bed.underlay()
    hosts: dict[str, NodeNs] = {}
    models: dict[str, m.Node] = {}
    reflectors = set(rr)
    for name, host in names_hosts:
        hosts[name] = bed.node(name, underlay, host)
        models[name] = m.Node(name=name, ip=hosts[name].ip, rr_cluster_id="1.0.0.1" if name in reflectors else None)
    return Cluster(bed, underlay, hosts, models)


@contextmanager
def speakers(
    cluster: Cluster, names: Iterable[str], cfg: m.ClusterConfig | None = None
) -> Iterator[dict[str, Speaker]]:
    """Started speakers for ``names`` (stopped, ExaBGP and bridge gone, on exit)."""
    cfg = cfg or m.ClusterConfig()
    out: dict[str, Speaker] = {}
    tmp = Path(tempfile.mkdtemp(prefix="podnet-bgp-"))
    try:
        for name in names:
            out[name] = start_speaker(cluster, name, tmp / name, cfg)
        yield out
    finally:
        pids = [p for sp in out.values() for p in (sp.exabgp_pid, sp.bridge_pid) if p is not None]
        for sp in out.values():
            sp.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    # stop() leaves no ExaBGP or bridge behind (the bridge exits with ExaBGP or is killed by pid)
    assert eventually(lambda: not [p for p in pids if alive(p)], timeout=5), f"left running: {pids}"


def start_speaker(cluster: Cluster, name: str, workdir: Path, cfg: m.ClusterConfig) -> Speaker:
    ident = identity(cluster.models[name], cfg)
    sp = Speaker(SpeakerConfig(ident, backoff_initial=0.2), workdir, netns=cluster.hosts[name].ns.name)
    sp.start()
    return sp


def ident_of(cluster: Cluster, name: str) -> SpeakerIdentity:
    return identity(cluster.models[name], m.ClusterConfig())


def established(sp: Speaker, addresses: Iterable[str] | None = None) -> bool:
    states = {p.address: p.state for p in sp.peer_status() if p.state != "Invalid"}
    wanted = set(addresses) if addresses is not None else set(states)
    return all(states.get(a) == "Established" for a in wanted)


def settled(sp: Speaker, seconds: float) -> bool:
    """Every usable session Established for at least ``seconds``."""
    now = dt.datetime.now(dt.UTC)
    return all(
        p.state == "Established" and (now - dt.datetime.fromisoformat(p.since)).total_seconds() >= seconds
        for p in sp.peer_status()
        if p.state != "Invalid"
    )


def wait(pred: object, timeout: float = 20.0, what: str = "") -> None:
    assert callable(pred)
    assert eventually(pred, timeout=timeout, interval=0.05), f"timed out after {timeout}s: {what}"


# ---- BIRD 2 ------------------------------------------------------------------------------------------------------


@dataclass
class BirdPeer:
    address: str
    as_number: int
    rr_client: bool = False
    password: str | None = None


class Bird:
    """BIRD 2 in a node namespace: BGP only (no kernel export), short timers, control socket in a temp dir."""

    def __init__(self, bed: NetnsBed, host: NodeNs, router_id: str, as_number: int, workdir: Path) -> None:
        self.bed = bed
        self.host = host
        self.router_id = router_id
        self.as_number = as_number
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "bird.conf"
        self.ctl = self.dir / "bird.ctl"
        self.proc: subprocess.Popen[str] | None = None

    def configure(
        self,
        peers: Iterable[BirdPeer],
        static: Iterable[str] = (),
        hold: int = 3,
        paths: dict[str, tuple[int, ...]] | None = None,
    ) -> None:
        """``paths``: prefix -> AS numbers BIRD puts in front of that route's AS_PATH when it exports it (an eBGP
        session then adds BIRD's own AS in front of those)."""
        export = "all"
        if paths:
            rules = " ".join(
                f"if net = {prefix} then {{ " + " ".join(f"bgp_path.prepend({a});" for a in reversed(path)) + " }"
                for prefix, path in paths.items()
            )
            export = f"filter {{ {rules} accept; }}"
        lines = [
            f"router id {self.router_id};",
            "protocol device { }",
        ]
        if static:
            lines.append(
                "protocol static podnet_static { ipv4; " + " ".join(f"route {p} blackhole;" for p in static) + " }"
            )
        for i, peer in enumerate(peers):
            body = [
                f"  local {self.host.address} as {self.as_number};",
                f"  neighbor {peer.address} as {peer.as_number};",
                f"  hold time {hold}; keepalive time 1;",
                "  connect retry time 2; error wait time 1, 10;",
                "  graceful restart on;",
                f"  ipv4 {{ import all; export {export}; next hop keep; }};",
            ]
            if peer.as_number == self.as_number and peer.rr_client:
                body.append("  rr client; rr cluster id 10.10.10.10;")
            if peer.password is not None:
                body.append(f'  password "{peer.password}";')
            lines.append(f"protocol bgp p{i} {{\n" + "\n".join(body) + "\n}")
        self.conf.write_text("\n".join(lines) + "\n")
        if self.proc is None:
            self.proc = self.host.ns.popen("bird", "-f", "-c", str(self.conf), "-s", str(self.ctl))
            wait(self.ctl.exists, 10, "bird control socket")
        else:
            self.birdc("configure")

    def birdc(self, *args: str) -> str:
        return self.host.ns.run("birdc", "-s", str(self.ctl), *args, check=False).stdout

    def routes(self) -> dict[str, dict[str, str]]:
        """prefix -> attributes of BIRD's best BGP route (next hop, originator, cluster list, from)."""
        out = self.birdc("show", "route", "all")
        routes: dict[str, dict[str, str]] = {}
        current: dict[str, str] | None = None
        for line in out.splitlines():
            head = re.match(r"^(\d+\.\d+\.\d+\.\d+/\d+)\s+\S+\s+\[(\S+)", line)
            if head:
                current = {"proto": head.group(2)}
                routes[head.group(1)] = current
                continue
            if current is None:
                continue
            attr = re.match(r"^\s+BGP\.(\S+): (.*)$", line)
            if attr:
                current[attr.group(1)] = attr.group(2).strip()
            via = re.match(r"^\s+via (\S+)", line)
            if via:
                current["via"] = via.group(1)
        return {p: r for p, r in routes.items() if r["proto"].startswith("p")}

    def protocol_states(self) -> dict[str, str]:
        out = self.birdc("show", "protocols")
        return {line.split()[0]: line for line in out.splitlines() if line.startswith("p")}


# ---- GoBGP -------------------------------------------------------------------------------------------------------


class GoBGP:
    def __init__(self, bed: NetnsBed, host: NodeNs, router_id: str, as_number: int, workdir: Path) -> None:
        self.host = host
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.router_id = router_id
        self.as_number = as_number
        self.proc: subprocess.Popen[str] | None = None
        self.api = f"{host.address}:50051"

    def start(self, neighbors: Iterable[str], hold: int = 3, peer_as: int | None = None) -> None:
        conf = self.dir / "gobgpd.toml"
        parts = [
            "[global.config]",
            f"  as = {self.as_number}",
            f'  router-id = "{self.router_id}"',
            "  port = 179",
            f'  local-address-list = ["{self.host.address}"]',
        ]
        for n in neighbors:
            parts += [
                "[[neighbors]]",
                "  [neighbors.config]",
                f'    neighbor-address = "{n}"',
                f"    peer-as = {peer_as or self.as_number}",
                "  [neighbors.timers.config]",
                f"    hold-time = {hold}",
                "    keepalive-interval = 1",
                "    connect-retry = 1",
                "  [[neighbors.afi-safis]]",
                "    [neighbors.afi-safis.config]",
                '      afi-safi-name = "ipv4-unicast"',
            ]
        conf.write_text("\n".join(parts) + "\n")
        self.proc = self.host.ns.popen(
            "gobgpd", "-f", str(conf), "-t", "toml", "--api-hosts", self.api, "--disable-stdlog", "-l", "warn"
        )

    def gobgp(self, *args: str) -> str:
        host, port = self.api.split(":")
        return self.host.ns.run("gobgp", "-u", host, "-p", port, *args, check=False).stdout

    def add_route(self, prefix: str, *attrs: str) -> str:
        """``attrs``: more of gobgp's path arguments, e.g. ``aspath 65010,65011``."""
        return self.gobgp("global", "rib", "add", prefix, "nexthop", self.host.address, *attrs, "-a", "ipv4")

    def rib(self) -> dict[str, dict[str, object]]:
        """prefix -> {next_hop, originator_id, cluster_list} of the paths GoBGP received."""
        raw = self.gobgp("global", "rib", "-a", "ipv4", "-j")
        try:
            doc = json.loads(raw or "{}")
        except ValueError:
            return {}
        out: dict[str, dict[str, object]] = {}
        for prefix, paths in doc.items():
            for path in paths:
                info: dict[str, object] = {"source": path.get("source-id"), "neighbor": path.get("neighbor-ip")}
                for attr in path.get("attrs", []):
                    t = attr.get("type")
                    if t == 3:
                        info["next_hop"] = attr.get("nexthop")
                    elif t == 9:
                        info["originator_id"] = attr.get("value")
                    elif t == 10:
                        info["cluster_list"] = attr.get("value")
                    elif t == 2:  # AS_PATH: (segment type 1 = set, 2 = sequence; its AS numbers) per segment
                        info["as_path"] = [
                            (seg.get("segment_type"), seg.get("asns")) for seg in attr.get("as_paths", [])
                        ]
                if path.get("best", True):
                    out[prefix] = info
        return out

    def neighbor_states(self) -> str:
        return self.gobgp("neighbor")
