"""The policy writer's metrics against the real kernel, in a node namespace, both iptables backends: what
``podnet_policy_owned_*`` says is what ``iptables-save`` and ``ipset list`` show; a sync that writes raises the
``iptables-restore`` counter, one that writes nothing does not; a rule the kernel refuses is counted as a failed
``iptables-restore`` and as a policy rejected by the kernel. The output passes ``promtool check metrics``."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.calc.policy import PolicyStatus
from agent.calc.state import Chain, DataplaneState, IpSet, KernelJump
from agent.dataplane.backend import Backend
from agent.dataplane.cmd import CommandRunner
from agent.dataplane.policy_syncer import Desired, PolicySyncer
from agent.dataplane.programmer import PolicyDataplane
from daemon.metrics_node import register_node_metrics
from testbed.netns import NetnsBed, NodeNs

pytestmark = pytest.mark.netns
MARK = "-j MARK --set-xmark 0x10000/0x10000"
REFUSED_RULE = f"-p tcp -m ipvs --vport 8080 {MARK}"  # this kernel has no ipvs match: the kernel refuses it
POLICY = "default/bad"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Source:
    """Two policy chains and a set, as the compiler would shape them; ``bad``'s chain may hold a refused rule."""

    def __init__(self) -> None:
        self.revision = 10
        self.good: tuple[str, ...] = ("-s 10.244.0.2/32 " + MARK,)
        self.bad: tuple[str, ...] = ("-m set --match-set podnet-s-c src " + MARK,)
        self.members = frozenset({"10.244.0.3", "10.244.0.4"})
        self.syncer: PolicySyncer | None = None

    def desired(self) -> Desired:
        refused = self.syncer.refused if self.syncer is not None else {}
        bad = ("-j DROP",) if POLICY in refused else self.bad
        chains = [
            Chain("podnet-FORWARD", ("-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT", "-j podnet-pi-good")),
            Chain("podnet-pi-good", (*self.good, "-j podnet-pi-bad")),
            Chain("podnet-pi-bad", bad),
        ]
        return Desired(
            self.revision,
            DataplaneState(
                ipsets={"podnet-s-c": IpSet("podnet-s-c", "hash:ip", self.members)},
                tables={"filter": {c.name: c for c in chains}},
                jumps=(KernelJump("filter", "FORWARD", "-j podnet-FORWARD"),),
            ),
            source_of=lambda chain: POLICY if chain == "podnet-pi-bad" else None,
            version_of=lambda source: self.bad if source == POLICY else None,
        )


@dataclass
class Verdicts:
    """The policy feed's statuses as compile_node reports them: a policy the syncer says was refused is rejected."""

    syncer: PolicySyncer

    @property
    def statuses(self) -> dict[tuple[str, str], PolicyStatus]:
        refused = self.syncer.refused
        return {
            ("default", "good"): PolicyStatus("default", "good", True),
            ("default", "bad"): PolicyStatus("default", "bad", POLICY not in refused, refused.get(POLICY, "")),
        }


def scrape(registry: CollectorRegistry) -> tuple[str, Samples]:
    text = generate_latest(registry).decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, out


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def kernel_counts(node: NodeNs, backend: str) -> tuple[int, int, int, int]:
    """podnet chains, rules in them, podnet sets and their members, as the kernel lists them."""
    save = node.ns.run(f"iptables-{backend}-save", "-t", "filter").stdout.splitlines()
    chains = sum(1 for line in save if line.startswith(":podnet-"))
    rules = sum(1 for line in save if line.startswith("-A podnet-"))
    sets = [s for s in node.ns.run("ipset", "list", "-n").stdout.split() if s.startswith("podnet-")]
    members = 0
    for name in sets:
        listing = node.ns.run("ipset", "list", name).stdout
        members += len(listing.split("Members:\n", 1)[1].split())
    return chains, rules, len(sets), members


def owned(samples: Samples) -> tuple[int, int, int, int]:
    return (
        int(get(samples, "podnet_policy_owned_chains", table="filter")),
        int(get(samples, "podnet_policy_owned_rules", table="filter")),
        int(get(samples, "podnet_policy_owned_ipsets")),
        int(get(samples, "podnet_policy_ipset_members")),
    )


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: scripts/bootstrap installs it (Debian package prometheus)")
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_policy_metrics_follow_the_kernel(netns_bed: NetnsBed, backend: str) -> None:
    node = netns_bed.node("n1", netns_bed.underlay(), 11)
    runner = CommandRunner(node.ns.name)
    source = Source()
    syncer = PolicySyncer(PolicyDataplane(runner, Backend(backend)), source.desired)
    source.syncer = syncer
    registry = CollectorRegistry()
    register_node_metrics(
        registry,
        policy_of=lambda: syncer,
        verdicts_of=lambda: Verdicts(syncer),
        commands_of=lambda: runner.stats,
    )
    try:
        syncer.sync_once()
        _, first = scrape(registry)
        assert owned(first) == kernel_counts(node, backend) == (3, 5, 1, 2)
        restores = get(first, "podnet_dataplane_command_total", tool="iptables-restore")
        assert restores >= 1 and get(first, "podnet_dataplane_command_errors_total", tool="iptables-restore") == 0
        assert get(first, "podnet_policy_sync_duration_seconds_count", kind="full") == 1
        assert get(first, "podnet_policy_synced_revision") == 10

        # One rule and one member change: one more iptables-restore, and the counts follow the kernel.
        source.revision, source.good = 11, (*source.good, "-s 10.244.0.9/32 " + MARK)
        source.members = source.members | {"10.244.0.5"}
        syncer.sync_once()
        _, second = scrape(registry)
        assert get(second, "podnet_dataplane_command_total", tool="iptables-restore") == restores + 1
        assert owned(second) == kernel_counts(node, backend) == (3, 6, 1, 3)
        assert get(second, "podnet_policy_sync_duration_seconds_count", kind="incremental") == 1

        # Nothing to write: no iptables-restore.
        syncer.sync_once()
        _, third = scrape(registry)
        assert get(third, "podnet_dataplane_command_total", tool="iptables-restore") == restores + 1

        # A rule the kernel refuses: a failed iptables-restore, the policy rejected by the kernel.
        source.revision, source.bad = 12, (*source.bad, REFUSED_RULE)
        syncer.sync_once()
        text, fourth = scrape(registry)
        assert get(fourth, "podnet_dataplane_command_errors_total", tool="iptables-restore") >= 1
        assert get(fourth, "podnet_policies_rejected", cause="kernel") == 1
        assert get(fourth, "podnet_policies_active") == 1
        assert owned(fourth) == kernel_counts(node, backend)
        promtool_check(text)
    finally:
        PolicyDataplane(runner, Backend(backend)).remove_all()
    assert "podnet" not in node.ns.run(f"iptables-{backend}-save").stdout
