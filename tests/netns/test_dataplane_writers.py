"""The policy dataplane writers against the real kernel (legacy and nft iptables, ipset), inside test namespaces:
packets pass or drop as the state says, only changes are written, foreign rules are never touched, drift is
repaired, nothing is written before the datastore is in sync, stale objects go only after the first full sync."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import pytest

from agent.calc.policy import compile_node
from agent.calc.snapshot import Snapshot
from agent.calc.state import Chain, DataplaneState, IpSet, KernelJump
from agent.dataplane.backend import Backend, detect
from agent.dataplane.cmd import CommandRunner
from agent.dataplane.policy_syncer import Desired, PolicySyncer
from agent.dataplane.programmer import PolicyDataplane
from agent.dataplane.render import RenderError
from datastore import model as m
from testbed.netns import NetnsBed, NodeNs, Pod
from testbed.wait import eventually

pytestmark = pytest.mark.netns
BACKENDS = ["legacy", "nft"]
PORT = 8080


@dataclass
class Bed:
    node: NodeNs
    a: Pod
    b: Pod  # isolated: only what is in podnet-s-allow-b may reach it
    c: Pod  # allowed to reach b

    def reach(self, src: Pod) -> bool:
        return src.ns.connect("tcp", self.b.ip, PORT, timeout=0.3)


def make_bed(bed: NetnsBed) -> Bed:
    ul = bed.underlay()
    node = bed.node("n1", ul, 11)
    a = bed.pod(node, "default", "a", "10.244.0.2")
    b = bed.pod(node, "default", "b", "10.244.0.3")
    c = bed.pod(node, "default", "c", "10.244.0.4")
    b.ns.listen("tcp", PORT)
    return Bed(node, a, b, c)


def isolate_b(bed: Bed, allowed: set[str], set_type: str = "hash:ip") -> DataplaneState:
    """A hand-built state shaped like the compiler's: dispatch by interface, allow-set, default drop."""
    chains = {
        "podnet-FORWARD": Chain(
            "podnet-FORWARD",
            (
                "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                "-m conntrack --ctstate INVALID -j DROP",
                f"-o {bed.b.host_iface} -j podnet-to-b",
            ),
        ),
        "podnet-to-b": Chain("podnet-to-b", ("-m set --match-set podnet-s-allow-b src -j ACCEPT", "-j DROP")),
        "podnet-INPUT": Chain("podnet-INPUT", ("-i cali+ -p tcp --dport 9 -j DROP",)),
        "podnet-OUTPUT": Chain("podnet-OUTPUT", ()),
    }
    return DataplaneState(
        ipsets={"podnet-s-allow-b": IpSet("podnet-s-allow-b", set_type, frozenset(allowed))},
        tables={"filter": chains},
        jumps=tuple(
            KernelJump("filter", c, f"-m comment --comment podnet -j podnet-{c}")
            for c in ("FORWARD", "INPUT", "OUTPUT")
        ),
    )


def save(node: NodeNs, backend: str) -> str:
    return node.ns.run(f"iptables-{backend}-save").stdout


def ipsets(node: NodeNs) -> str:
    return node.ns.run("ipset", "save").stdout


def body(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("#")]


def foreign_lines(text: str) -> list[str]:
    """iptables-save minus comments, counters and our own lines."""
    out = []
    for line in text.splitlines():
        if line.startswith("#") or "podnet" in line:
            continue
        out.append(re.sub(r"\[\d+:\d+\]", "[0:0]", line))
    return out


def chain_rules(text: str, chain: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"-A {chain} ")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_is_enforced_and_updated_incrementally(netns_bed: NetnsBed, backend: str) -> None:
    bed = make_bed(netns_bed)
    assert bed.reach(bed.a) and bed.reach(bed.c)
    runner = CommandRunner(bed.node.ns.name)
    # A set left by an earlier run, too small for what is coming: adopted now, rebuilt when it must grow.
    runner.run(["ipset", "create", "podnet-s-allow-b", "hash:ip", "maxelem", "4"])
    dp = PolicyDataplane(runner, Backend(backend))

    first = dp.apply(isolate_b(bed, {bed.c.ip}))
    assert first.full and len(first.chains_written) == 4 and len(first.jumps_fixed) == 3
    assert first.sets_rebuilt == []
    assert not bed.reach(bed.a)
    assert bed.reach(bed.c)
    assert "-A FORWARD -m comment --comment podnet -j podnet-FORWARD" in save(bed.node, backend)

    # One member more: an ipset delta only, no iptables write, no kernel read-back.
    second = dp.apply(isolate_b(bed, {bed.c.ip, bed.a.ip}))
    assert not second.full and second.chains_written == [] and second.sets_changed == 1
    assert bed.reach(bed.a)

    # Beyond maxelem: rebuilt beside the live set and swapped in; the rule referencing it keeps working.
    grown = {bed.a.ip, bed.c.ip, "10.244.9.1", "10.244.9.2", "10.244.9.3"}
    third = dp.apply(isolate_b(bed, grown))
    assert third.sets_rebuilt == ["podnet-s-allow-b"] and third.chains_written == []
    assert "create podnet-s-allow-b hash:ip family inet hashsize 1024 maxelem 65536" in ipsets(bed.node)
    assert "podnet-t-" not in ipsets(bed.node)
    assert bed.reach(bed.a) and bed.reach(bed.c)

    # Nothing changed: nothing written.
    assert not dp.apply(isolate_b(bed, grown)).wrote

    # A type change under the same name, while a rule references the set: rules moved to a temporary set of the
    # new type and back; the chains keep their content (nothing rewritten), the set has its new type and members.
    retyped = dp.apply(isolate_b(bed, {"10.244.0.2/31"}, "hash:net"))
    assert retyped.sets_rebuilt == ["podnet-s-allow-b"] and retyped.chains_written == []
    assert "create podnet-s-allow-b hash:net" in ipsets(bed.node)
    assert "podnet-t-" not in ipsets(bed.node)
    assert "podnet-t-" not in save(bed.node, backend)
    assert bed.reach(bed.a)
    assert not bed.reach(bed.c)
    assert not dp.apply(isolate_b(bed, {"10.244.0.2/31"}, "hash:net"), full=True).wrote

    # A state that cannot be written (a chain name that is not ours) is refused before anything is touched.
    kernel_before = (save(bed.node, backend), ipsets(bed.node))
    bad = isolate_b(bed, {bed.c.ip})
    bad.tables["filter"]["KUBE-NOT-OURS"] = Chain("KUBE-NOT-OURS", ("-j ACCEPT",))
    with pytest.raises(RenderError, match="KUBE-NOT-OURS"):
        dp.apply(bad)
    assert (save(bed.node, backend), ipsets(bed.node)) == kernel_before

    dp.remove_all()
    assert "podnet" not in save(bed.node, backend)
    assert "podnet" not in ipsets(bed.node)
    assert bed.reach(bed.a) and bed.reach(bed.c)


FOREIGN = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-NPX46M4PTMTKRN6Y - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment "default/kubernetes:https cluster IP" -m tcp --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y
-A KUBE-SVC-NPX46M4PTMTKRN6Y -p tcp -m comment --comment "default/kubernetes:https" -m tcp -j DNAT --to-destination 192.168.77.11:6443
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER-USER - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -j DOCKER-USER
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A OUTPUT -j KUBE-FIREWALL
-A DOCKER-USER -j RETURN
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
COMMIT
"""  # noqa: E501


@pytest.mark.parametrize("backend", BACKENDS)
def test_foreign_rules_are_byte_identical_through_sync_restart_and_cleanup(netns_bed: NetnsBed, backend: str) -> None:
    bed = make_bed(netns_bed)
    runner = CommandRunner(bed.node.ns.name)
    runner.run([f"iptables-{backend}-restore"], stdin=FOREIGN)
    before = save(bed.node, backend)
    assert "KUBE-FORWARD" in before and "podnet" not in before
    expected = foreign_lines(before)

    dp = PolicyDataplane(runner, Backend(backend))
    dp.apply(isolate_b(bed, {bed.c.ip}))
    after_sync = save(bed.node, backend)
    assert foreign_lines(after_sync) == expected
    # Ours is first in each built-in chain, theirs follow in their order.
    assert chain_rules(after_sync, "FORWARD")[0] == "-A FORWARD -m comment --comment podnet -j podnet-FORWARD"
    assert not bed.reach(bed.a) and bed.reach(bed.c)

    # Restart: a fresh writer adopts what is there, writes nothing, and deletes nothing foreign even in cleanup mode.
    restarted = PolicyDataplane(runner, Backend(backend))
    result = restarted.apply(isolate_b(bed, {bed.c.ip}), delete_stale=True)
    assert result.full and not result.wrote
    assert save(bed.node, backend).count("-j podnet-FORWARD") == 1
    assert foreign_lines(save(bed.node, backend)) == expected

    # An update, then uninstall.
    restarted.apply(isolate_b(bed, {bed.a.ip}), delete_stale=True)
    assert foreign_lines(save(bed.node, backend)) == expected
    restarted.remove_all()
    final = save(bed.node, backend)
    assert "podnet" not in final
    assert foreign_lines(final) == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_periodic_resync_repairs_drift(netns_bed: NetnsBed, backend: str) -> None:
    bed = make_bed(netns_bed)
    runner = CommandRunner(bed.node.ns.name)
    state = isolate_b(bed, {bed.c.ip})
    syncer = PolicySyncer(PolicyDataplane(runner, Backend(backend)), lambda: Desired(1, state), resync_interval=0.3)
    syncer.start()
    try:
        assert eventually(lambda: syncer.syncs >= 1, timeout=10)
        assert not bed.reach(bed.a)
        good = save(bed.node, backend)

        # Someone deletes our chain by hand (after unhooking it) and removes a set member. (The broken state is not
        # asserted: the resync may already have repaired it.)
        runner.run(
            [f"iptables-{backend}-restore", "--noflush"],
            stdin="*filter\n-F podnet-FORWARD\n-F podnet-to-b\n-X podnet-to-b\nCOMMIT\n",
        )
        assert "podnet-to-b" not in save(bed.node, backend) or syncer.syncs > 1
        runner.run(["ipset", "del", "podnet-s-allow-b", bed.c.ip])
        assert eventually(lambda: "-A podnet-to-b" in save(bed.node, backend), timeout=5)
        assert not bed.reach(bed.a)
        assert bed.reach(bed.c)
        assert foreign_lines(save(bed.node, backend)) == foreign_lines(good)

        # Someone inserts a rule above our jump: ours goes back to the top, theirs stays, second.
        runner.run(
            [f"iptables-{backend}", "-I", "FORWARD", "1", "-m", "comment", "--comment", "intruder", "-j", "ACCEPT"]
        )

        def ours_first() -> bool:
            rules = chain_rules(save(bed.node, backend), "FORWARD")
            assert len(rules) == 2
            return rules[0].endswith("-j podnet-FORWARD") and "intruder" in rules[1]

        assert eventually(ours_first, timeout=5)
        assert len(chain_rules(save(bed.node, backend), "FORWARD")) == 2
        assert not bed.reach(bed.a)
        assert syncer.last_error is None
    finally:
        syncer.stop()
        PolicyDataplane(runner, Backend(backend)).remove_all()


def test_nothing_written_before_in_sync_and_stale_removed_after_first_full_sync(netns_bed: NetnsBed) -> None:
    bed = make_bed(netns_bed)
    runner = CommandRunner(bed.node.ns.name)
    # What an older podnet left behind: a chain hooked into INPUT, and a set.
    runner.run(
        ["iptables-nft-restore", "--noflush"],
        stdin="*filter\n:podnet-old - [0:0]\n-A podnet-old -j RETURN\n-I INPUT 1 -j podnet-old\nCOMMIT\n",
    )
    runner.run(["ipset", "create", "podnet-s-old", "hash:ip"])
    before = body(save(bed.node, "nft"))

    in_sync = threading.Event()
    state = isolate_b(bed, {bed.c.ip})
    syncer = PolicySyncer(
        PolicyDataplane(runner, Backend("nft")),
        lambda: Desired(7, state) if in_sync.is_set() else None,
        resync_interval=60,
    )
    syncer.start()
    try:
        syncer.mark_dirty()
        assert not eventually(lambda: syncer.syncs > 0, timeout=1.0)
        assert body(save(bed.node, "nft")) == before  # not a rule written, not a stale one removed
        assert bed.reach(bed.a)
        in_sync.set()
        syncer.mark_dirty()
        assert eventually(lambda: syncer.syncs == 1, timeout=10)
        after = save(bed.node, "nft")
        assert "podnet-old" not in after and "podnet-to-b" in after
        assert "podnet-s-old" not in ipsets(bed.node)
        assert not bed.reach(bed.a) and bed.reach(bed.c)
    finally:
        syncer.stop()
        PolicyDataplane(runner, Backend("nft")).remove_all()


def test_backend_detection_follows_the_rules_already_there(netns_bed: NetnsBed) -> None:
    ul = netns_bed.underlay()
    node = netns_bed.node("n1", ul, 11)
    runner = CommandRunner(node.ns.name)
    assert detect(runner, "auto").name == "nft"  # a fresh node
    runner.run(["iptables-legacy", "-A", "FORWARD", "-j", "ACCEPT"])
    assert detect(runner, "auto").name == "legacy"
    runner.run(["iptables-nft", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"])
    assert detect(runner, "auto").name == "nft"  # kubelet says so
    assert detect(runner, "legacy").name == "legacy"
    with pytest.raises(ValueError, match="backend"):
        detect(runner, "ebtables")


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_incremental_sync_rechecks_and_fixes_the_jumps(netns_bed: NetnsBed, backend: str) -> None:
    """The built-in chains are re-read on every sync (in the background, while it writes), not only on resyncs: a
    jump pushed down or deleted is back on top when the next change's sync returns."""
    bed = make_bed(netns_bed)
    runner = CommandRunner(bed.node.ns.name)
    dp = PolicyDataplane(runner, Backend(backend))
    try:
        assert dp.apply(isolate_b(bed, {bed.c.ip}), full=True).full
        assert not bed.reach(bed.a) and bed.reach(bed.c)
        quiet = dp.apply(isolate_b(bed, {bed.c.ip}))
        assert not quiet.full and not quiet.wrote  # nothing changed: nothing written, the re-read found all well

        ipt = f"iptables-{backend}"
        runner.run([ipt, "-I", "FORWARD", "1", "-m", "comment", "--comment", "intruder", "-j", "ACCEPT"])
        assert bed.reach(bed.a)  # the intruder accepts everything before our jump
        r = dp.apply(isolate_b(bed, {bed.c.ip, bed.a.ip}))  # a change: a's address joins the allow-set
        assert not r.full and r.jumps_fixed == ["filter/FORWARD"] and r.sets_changed == 1
        rules = chain_rules(save(bed.node, backend), "FORWARD")
        assert rules[0].endswith("-j podnet-FORWARD") and "intruder" in rules[1] and len(rules) == 2

        runner.run([ipt, "-D", "INPUT", "-m", "comment", "--comment", "podnet", "-j", "podnet-INPUT"])
        r = dp.apply(isolate_b(bed, {bed.c.ip}))  # a's address leaves the set again
        assert not r.full and r.jumps_fixed == ["filter/INPUT"]
        assert chain_rules(save(bed.node, backend), "INPUT") == ["-A INPUT -m comment --comment podnet -j podnet-INPUT"]
        assert not bed.reach(bed.a) and bed.reach(bed.c)
        again = dp.apply(isolate_b(bed, {bed.c.ip}))
        assert not again.wrote and not again.jumps_fixed

        # The same when the change rewrites a chain (legacy re-asserts the jumps inside that transaction; a jump
        # deleted by hand makes it fail, and the writer falls back to a full sync at once).
        def port_changed(port: int) -> DataplaneState:
            st = isolate_b(bed, {bed.c.ip})
            chains = dict(st.tables["filter"])
            chains["podnet-INPUT"] = Chain("podnet-INPUT", (f"-i cali+ -p tcp --dport {port} -j DROP",))
            return DataplaneState(ipsets=st.ipsets, tables={"filter": chains}, jumps=st.jumps)

        runner.run([ipt, "-D", "FORWARD", "-m", "comment", "--comment", "intruder", "-j", "ACCEPT"])
        runner.run([ipt, "-I", "FORWARD", "1", "-m", "comment", "--comment", "intruder", "-j", "ACCEPT"])
        r = dp.apply(port_changed(10))
        assert r.chains_written == ["filter/podnet-INPUT"]
        rules = chain_rules(save(bed.node, backend), "FORWARD")
        assert rules[0].endswith("-j podnet-FORWARD") and "intruder" in rules[1] and len(rules) == 2
        runner.run([ipt, "-D", "FORWARD", "-m", "comment", "--comment", "podnet", "-j", "podnet-FORWARD"])
        assert bed.reach(bed.a)
        r = dp.apply(port_changed(11))
        assert "filter/FORWARD" in r.jumps_fixed
        rules = chain_rules(save(bed.node, backend), "FORWARD")
        assert rules[0].endswith("-j podnet-FORWARD") and "intruder" in rules[1] and len(rules) == 2
        assert "--dport 11 " in "".join(chain_rules(save(bed.node, backend), "podnet-INPUT"))
        assert not bed.reach(bed.a) and bed.reach(bed.c)
    finally:
        PolicyDataplane(runner, Backend(backend)).remove_all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_compilers_state_reads_back_as_written(netns_bed: NetnsBed, backend: str) -> None:
    """The compiler's chains, hashed or plain (the hot ones carry no comments and are compared by their text), read
    back from the kernel exactly as written: a second writer's full sync adopts everything and writes nothing."""
    bed = make_bed(netns_bed)
    pods = {"a": bed.a, "b": bed.b, "c": bed.c}
    snap = Snapshot(
        revision=1,
        in_sync=True,
        namespaces={"default": m.Namespace("default", {"kubernetes.io/metadata.name": "default"})},
        pods={("default", n): m.Pod("default", n, {"app": n}, (p.ip,), "n1") for n, p in pods.items()},
        endpoints={
            ("n1", "default", n, "eth0"): m.Endpoint("n1", "default", n, "eth0", p.host_iface, (f"{p.ip}/32",))
            for n, p in pods.items()
        },
        policies={
            ("default", "b"): m.Policy(
                "default",
                "b",
                {
                    "podSelector": {"matchLabels": {"app": "b"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "c"}}}]}],
                },
            )
        },
    )
    state = compile_node(snap, "n1").state
    assert any(not c.hashed for c in state.tables["filter"].values())
    runner = CommandRunner(bed.node.ns.name)
    try:
        assert PolicyDataplane(runner, Backend(backend)).apply(state, full=True).wrote
        assert not bed.reach(bed.a) and bed.reach(bed.c)
        again = PolicyDataplane(runner, Backend(backend)).apply(state, full=True)
        assert not again.wrote, again
        assert chain_rules(save(bed.node, backend), "FORWARD") == ["-A FORWARD -j podnet-FORWARD"]
        assert "comment" not in "".join(chain_rules(save(bed.node, backend), "podnet-FORWARD"))
    finally:
        PolicyDataplane(runner, Backend(backend)).remove_all()
