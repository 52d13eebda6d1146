"""A podnet cluster on this machine: a real etcd, one network namespace per node on a shared underlay bridge, and
per node what a node runs: one ``podnet-agent`` (datastore watch, policy writer, routes and devices, the ExaBGP
speaker, the CNI server, health endpoints). Pods are empty namespaces wired by the real
CNI plugin (ADD through `podnet-cni`), then recorded in the datastore as the controller would.

Everything runs in the root namespace and points into the node namespaces (``--netns``, the CNI's ``hostNetns``);
nothing touches the machine's own routes, links, iptables or ipsets. ``close`` stops every process it started (by
PID) and deletes every namespace, also after a failure or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from datastore import keys as k
from datastore import model as m
from datastore.etcd import EtcdClient
from datastore.store import Store
from ipam.allocator import Ipam
from ipam.pools import add_pool
from lab.scenario import OUTSIDE_RANGES, PodSpec, Scenario
from testbed.etcd_server import EtcdServer, free_port
from testbed.netns import Netns, NetnsBed, NodeNs, Underlay, sh
from testbed.wait import eventually

POOL = "10.244.0.0/16"
BIN = Path(sys.executable).parent


class LabError(RuntimeError):
    pass


@dataclass
class LabPod:
    spec: PodSpec
    ns: Netns
    ip: str
    listener: subprocess.Popen[str] | None = None


class Cluster:
    def __init__(self, scenario: Scenario, workdir: Path | None = None, log: IO[str] = sys.stderr) -> None:
        self.scenario = scenario
        self.log = log
        self._tmp = None if workdir else tempfile.mkdtemp(prefix="podnet-lab-")
        self.workdir = workdir or Path(self._tmp or "")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.etcd_server = EtcdServer()
        self.bed = NetnsBed()
        self.nodes: dict[str, NodeNs] = {}
        self.pods: dict[str, LabPod] = {}
        self.outside: LabPod | None = None  # the outside host (no pod spec: its key is its address)
        self.underlay: Underlay | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self.health_ports: dict[str, int] = {}
        self._etcd: EtcdClient | None = None

    # --- life cycle ---------------------------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        return self.etcd_server.endpoint

    @property
    def etcd(self) -> EtcdClient:
        assert self._etcd is not None, "start() first"
        return self._etcd

    def say(self, text: str) -> None:
        print(text, file=self.log, flush=True)

    def start(self) -> None:
        sc = self.scenario
        self.etcd_server.start()
        self._etcd = EtcdClient([self.endpoint])
        store = Store(self.etcd)
        store.put(m.ClusterConfig(encapsulation=sc.encapsulation))
        add_pool(store, m.IPPool(POOL, encapsulation=sc.encapsulation))
        underlay = self.underlay = self.bed.underlay()
        if sc.outside:
            self._add_outside(underlay, sc.outside)
        for i, name in enumerate(sc.nodes):
            node = self.bed.node(name, underlay, 11 + i)
            node.ns.sysctl("net.ipv4.ip_forward", "1")
            store.put(m.Node(name, node.ip))
            self.nodes[name] = node
        if sc.encapsulation == "vxlan":
            ipam = Ipam(self.etcd)
            for name in sc.nodes:
                ipam.ensure_tunnel_address(name, "vxlan")
        for ns, labels in sc.namespaces.items():
            store.put(m.Namespace(ns, {**labels, "kubernetes.io/metadata.name": ns}))
        for name, node in self.nodes.items():
            self._start_node(name, node)
        started = time.monotonic()
        self.wait_ready()
        self.say(f"lab: every agent ready in {time.monotonic() - started:.1f} s")
        self.say(
            f"lab: etcd at {self.endpoint}; {len(self.nodes)} nodes up ({sc.encapsulation}); workdir {self.workdir}"
        )

    def _add_outside(self, underlay: Underlay, address: str) -> None:
        """An outside host behind the underlay's router (which also routes the nodes' pod blocks, like a top-of-rack
        router that learned them)."""
        net = next(n for n in OUTSIDE_RANGES if ipaddress.IPv4Address(address) in n)
        gateway = net.network_address + 1
        ns = self.bed.netns("outside")
        sh(
            "ip",
            "link",
            "add",
            "eth0",
            "netns",
            ns.name,
            "type",
            "veth",
            "peer",
            "name",
            "o-ul",
            "netns",
            underlay.ns.name,
        )
        underlay.ns.ip("addr", "add", f"{gateway}/{net.prefixlen}", "dev", "o-ul")
        underlay.ns.ip("link", "set", "o-ul", "up")
        underlay.ns.sysctl("net.ipv4.ip_forward", "1")
        ns.ip("addr", "add", f"{address}/{net.prefixlen}", "dev", "eth0")
        ns.ip("link", "set", "eth0", "up")
        ns.ip("route", "add", "default", "via", str(gateway))
        self.outside = LabPod(PodSpec("", address, "", {}), ns, address)

    def _route_blocks_in_underlay(self) -> None:
        assert self.underlay is not None
        nodes = {name: node.address for name, node in self.nodes.items()}
        for block in Store(self.etcd).list(k.BLOCKS_PREFIX, m.Block):
            via = nodes.get(block.value.affine_node or "")
            if via is not None:
                self.underlay.ns.ip("route", "replace", block.value.cidr, "via", via)

    def _listen(self, ns: Netns, key: str) -> subprocess.Popen[str]:
        ports = self.scenario.ports()
        proc = ns.popen(sys.executable, "-m", "testbed.probe", "serve-many", *(f"{pr.lower()}/{p}" for p, pr in ports))
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise LabError(f"the listener in {key} did not start")
        return proc

    def participants(self) -> list[str]:
        """Pods ("ns/name") and the outside host (its address), in the order reports show them."""
        return sorted(self.pods) + ([self.outside.ip] if self.outside else [])

    def _spawn(self, node: NodeNs, role: str, argv: list[str]) -> None:
        logf = open(self.workdir / f"{node.name}-{role}.log", "ab")  # noqa: SIM115 - the child writes it
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        logf.close()
        self._procs.append(proc)

    def _start_node(self, name: str, node: NodeNs) -> None:
        """One ``podnet-agent`` per node (policy, routes and BGP, the CNI server), pointed into its namespace; its
        health endpoints on a free port of the machine's loopback."""
        port = self.health_ports.setdefault(name, free_port())
        self._spawn(node, "agent", [str(BIN / "podnet-agent"), "--node-name", name, "--netns", node.ns.name,
                                  "--etcd-endpoints", self.endpoint, "--workdir", str(self.workdir / name),
                                  "--health-bind", f"127.0.0.1:{port}", "--cni-socket", self.cni_socket(name),
                                  "--sync-period", "30s"])  # fmt: skip

    def readiness(self, name: str) -> tuple[int, str]:
        """The node agent's /readiness: (HTTP status, body); (0, why) when it does not answer."""
        url = f"http://127.0.0.1:{self.health_ports[name]}/readiness"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until every node's agent says ready (datastore read, first policy and route applies, BGP up)."""
        end = time.monotonic() + timeout
        waiting = list(self.nodes)
        while waiting:
            waiting = [n for n in waiting if self.readiness(n)[0] != 200]
            if not waiting:
                break
            if time.monotonic() > end:
                why = "; ".join(f"{n}: {self.readiness(n)[1].splitlines()[0] if self.readiness(n)[1] else '?'}"
                                for n in waiting)  # fmt: skip
                raise LabError(f"agents not ready after {timeout:.0f} s: {why}")
            time.sleep(0.2)

    def cni_socket(self, node: str) -> str:
        return str(self.workdir / f"{node}-cni.sock")

    def close(self) -> None:
        for pod in [*self.pods.values(), *([self.outside] if self.outside else [])]:
            if pod.listener is not None:
                self.bed.stop_process(pod.listener)
        for proc in reversed(self._procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._procs.clear()
        try:
            self.bed.close()  # also kills what is left inside the namespaces (ExaBGP, its bridge)
        finally:
            if self._etcd is not None:
                self._etcd.close()
            self.etcd_server.stop()
            if self._tmp:
                shutil.rmtree(self._tmp, ignore_errors=True)

    # --- pods ---------------------------------------------------------------------------------------------------

    def _cni(self, command: str, pod: PodSpec, netns: Netns | None) -> dict[str, object]:
        node_ns = f"/var/run/netns/{self.nodes[pod.node].ns.name}"
        conf = {"cniVersion": "1.0.0", "name": "podnet", "type": "podnet", "etcdEndpoints": [self.endpoint],
                "nodeName": pod.node, "mtu": 1400, "hostNetns": node_ns}  # fmt: skip
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_COMMAND": command,
               "CNI_IFNAME": "eth0", "CNI_PATH": str(BIN), "CNI_CONTAINERID": f"lab-{pod.namespace}-{pod.name}",
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name}",
               "PODNET_CNI_SOCKET": self.cni_socket(pod.node)}  # fmt: skip
        if netns is not None:
            env["CNI_NETNS"] = f"/var/run/netns/{netns.name}"
        proc = subprocess.run([str(BIN / "podnet-cni")], input=json.dumps(conf).encode(), env=env,
                              capture_output=True, timeout=120, check=False)  # fmt: skip
        out = json.loads(proc.stdout) if proc.stdout.strip() else {}
        if proc.returncode != 0:
            raise LabError(f"CNI {command} of {pod.key} failed: {out or proc.stderr.decode().strip()}")
        return out if isinstance(out, dict) else {}

    def add_pods(self) -> None:
        """Wire every pod with a CNI ADD (after the node's CNI server listens), record it, start its listeners."""
        store = Store(self.etcd)
        for spec in self.scenario.pods:
            sock = self.cni_socket(spec.node)
            if not eventually(functools.partial(os.path.exists, sock), timeout=30):
                raise LabError(f"the CNI server of {spec.node} never listened on {sock}")
            netns = self.bed.netns(f"{spec.namespace}-{spec.name}"[:40])
            result = self._cni("ADD", spec, netns)
            ips = result.get("ips")
            if not isinstance(ips, list) or not ips:
                raise LabError(f"CNI ADD of {spec.key} returned no address: {result}")
            ip = str(ips[0]["address"]).split("/")[0]
            store.put(m.Pod(spec.namespace, spec.name, dict(spec.labels), (ip,), spec.node))
            pod = LabPod(spec, netns, ip)
            pod.listener = self._listen(netns, spec.key)
            self.pods[spec.key] = pod
            self.say(f"lab: pod {spec.key} on {spec.node} at {ip}")
        if self.outside is not None:
            self._route_blocks_in_underlay()
            self.outside.listener = self._listen(self.outside.ns, "the outside host")

    # --- probing ------------------------------------------------------------------------------------------------

    def probe(self, port: int, proto: str, timeout: float = 0.5) -> dict[tuple[str, str], bool]:
        """Which participant reaches which on port/proto, with real connections (every source probes all at once);
        keys as ``participants()`` names them."""
        everyone = {key: pod for key, pod in self.pods.items()}
        if self.outside is not None:
            everyone[self.outside.ip] = self.outside
        keys = self.participants()
        procs = {}
        for src in keys:
            targets = [everyone[d].ip for d in keys if d != src]
            procs[src] = everyone[src].ns.popen(
                sys.executable, "-m", "testbed.probe", "sweep", proto.lower(), str(port), str(timeout), *targets
            )
        seen: dict[tuple[str, str], bool] = {}
        for src, proc in procs.items():
            out, err = proc.communicate(timeout=timeout * 4 + 30)
            self.bed.stop_process(proc)
            self.bed.processes.remove(proc)
            bits = out.strip()
            dsts = [d for d in keys if d != src]
            if proc.returncode != 0 or len(bits) != len(dsts):
                raise LabError(f"probe from {src} failed: {err.strip() or bits!r}")
            for d, bit in zip(dsts, bits, strict=True):
                seen[(src, d)] = bit == "1"
        return seen
