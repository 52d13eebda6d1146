"""One chain the kernel refuses costs that chain, not the node's policy: the writer narrows a refused transaction
down, writes every chain the kernel takes, holds the refused one closed (nothing passes it) and reports it, does not
retry it until its content changes, and keeps writing other changes meanwhile. Real kernel, both backends.

The refusal is real: a rule with the ipvs match, which this kernel lacks (the kernel refuses it, iptables passes
it on), the way a kernel without an optional match module refuses the rules that need it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.calc.state import Chain, DataplaneState, IpSet, KernelJump
from agent.dataplane.backend import Backend
from agent.dataplane.cmd import CommandRunner
from agent.dataplane.programmer import PolicyDataplane
from testbed.netns import NetnsBed, NodeNs, Pod

pytestmark = pytest.mark.netns
BACKENDS = ["legacy", "nft"]
PORT = 8080
MARK = "-j MARK --set-xmark 0x10000/0x10000"
ON_MARK = "-m mark --mark 0x10000/0x10000 -j RETURN"
REFUSED_RULE = f"-p tcp -m ipvs --vport {PORT} {MARK}"  # this kernel has no ipvs match


@dataclass
class Bed:
    node: NodeNs
    a: Pod
    b: Pod  # selected by policy "good"
    c: Pod
    d: Pod  # selected by policy "bad" (its rules are refused)

    def reach(self, src: Pod, dst: Pod) -> bool:
        return src.ns.connect("tcp", dst.ip, PORT, timeout=0.3)


def make_bed(bed: NetnsBed) -> Bed:
    ul = bed.underlay()
    node = bed.node("n1", ul, 11)
    pods = [bed.pod(node, "default", n, f"10.244.0.{i + 2}") for i, n in enumerate("abcd")]
    for p in (pods[1], pods[3]):
        p.ns.listen("tcp", PORT)
    return Bed(node, *pods)


def state(bed: Bed, good: tuple[str, ...], bad: tuple[str, ...]) -> DataplaneState:
    """Shaped like the compiler's: b's and d's ingress each go through one policy chain that marks what it allows."""

    def endpoint(policy: str) -> Chain:
        return Chain(f"podnet-tw-{policy}", ("-j MARK --set-xmark 0x0/0x10000", f"-j {policy}", ON_MARK, "-j DROP"))

    chains = [
        Chain(
            "podnet-FORWARD",
            (
                "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                f"-o {bed.b.host_iface} -g podnet-tw-podnet-pi-good",
                f"-o {bed.d.host_iface} -g podnet-tw-podnet-pi-bad",
            ),
        ),
        endpoint("podnet-pi-good"),
        endpoint("podnet-pi-bad"),
        Chain("podnet-pi-good", (*good, ON_MARK)),
        Chain("podnet-pi-bad", (*bad, ON_MARK)),
    ]
    return DataplaneState(
        ipsets={"podnet-s-c": IpSet("podnet-s-c", "hash:ip", frozenset({bed.c.ip}))},
        tables={"filter": {c.name: c for c in chains}},
        jumps=(KernelJump("filter", "FORWARD", "-j podnet-FORWARD"),),
    )


def chain_text(node: NodeNs, backend: str, chain: str) -> list[str]:
    text = node.ns.run(f"iptables-{backend}-save", "-t", "filter").stdout
    return [line for line in text.splitlines() if line.startswith(f"-A {chain} ")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refused_chain_is_held_closed_and_reported_while_the_rest_is_written(
    netns_bed: NetnsBed, backend: str
) -> None:
    bed = make_bed(netns_bed)
    runner = CommandRunner(bed.node.ns.name)
    dp = PolicyDataplane(runner, Backend(backend))
    from_c = f"-m set --match-set podnet-s-c src {MARK}"
    try:
        # "bad" would let c reach d; the kernel refuses its rule. Everything else is written.
        first = dp.apply(state(bed, good=(from_c,), bad=(from_c, REFUSED_RULE)), full=True)
        assert list(first.refused) == ["filter/podnet-pi-bad"], first.refused
        assert "ipvs" in first.refused["filter/podnet-pi-bad"]
        assert bed.reach(bed.c, bed.b) and not bed.reach(bed.a, bed.b)
        assert not bed.reach(bed.c, bed.d)  # what the refused chain would have allowed does not pass
        assert [line.split(" -j ")[-1] for line in chain_text(bed.node, backend, "podnet-pi-bad")] == ["DROP"]

        # Another policy changes: written at once (incrementally), the refused chain not tried again.
        from_a = f"-s {bed.a.ip}/32 {MARK}"
        second = dp.apply(state(bed, good=(from_c, from_a), bad=(from_c, REFUSED_RULE)))
        assert not second.full and second.chains_written == ["filter/podnet-pi-good"]
        assert list(second.refused) == ["filter/podnet-pi-bad"]
        assert bed.reach(bed.a, bed.b) and not bed.reach(bed.c, bed.d)

        # A full resync finds the placeholder as written: nothing to do, still reported.
        third = dp.apply(state(bed, good=(from_c, from_a), bad=(from_c, REFUSED_RULE)), full=True)
        assert not third.wrote and list(third.refused) == ["filter/podnet-pi-bad"]

        # The refused chain's content changes to one the kernel takes: written, no longer refused.
        fourth = dp.apply(state(bed, good=(from_c, from_a), bad=(from_c,)))
        assert fourth.chains_written == ["filter/podnet-pi-bad"] and fourth.refused == {}
        assert bed.reach(bed.c, bed.d) and not bed.reach(bed.a, bed.d)
    finally:
        PolicyDataplane(runner, Backend(backend)).remove_all()
    assert "podnet" not in bed.node.ns.run(f"iptables-{backend}-save").stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_chain_changed_into_a_refused_one_is_closed_not_left_as_it_was(netns_bed: NetnsBed, backend: str) -> None:
    """A policy chain already in the kernel whose new content is refused must not keep allowing what it allowed."""
    bed = make_bed(netns_bed)
    runner = CommandRunner(bed.node.ns.name)
    dp = PolicyDataplane(runner, Backend(backend))
    from_c = f"-m set --match-set podnet-s-c src {MARK}"
    try:
        assert dp.apply(state(bed, good=(from_c,), bad=(from_c,))).refused == {}
        assert bed.reach(bed.c, bed.d)
        changed = dp.apply(state(bed, good=(), bad=(from_c, REFUSED_RULE)))
        assert list(changed.refused) == ["filter/podnet-pi-bad"]
        assert "filter/podnet-pi-good" in changed.chains_written
        assert not bed.reach(bed.c, bed.d) and not bed.reach(bed.c, bed.b)
    finally:
        PolicyDataplane(runner, Backend(backend)).remove_all()
