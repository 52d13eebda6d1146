"""One spelling per option, derived from its name; the names other podnet programs already read agree with it; every
PODNET_* variable in the repository is an option or one the agent knows to leave alone; and the option table in
docs/daemon-config.md is the one generated from the definitions."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from agent.dataplane import backend
from daemon import config as c
from daemon import config_doc, endpoints
from daemon.config_values import BindAddress

ROOT = Path(__file__).resolve().parents[2]


def test_spellings_follow_the_convention_and_are_unique() -> None:
    opt = c.BY_NAME
    assert (opt["sync_period"].flag, opt["sync_period"].env, opt["sync_period"].key) == (
        "--sync-period", "PODNET_SYNC_PERIOD", "syncPeriod",
    )  # fmt: skip
    assert [opt[n].key for n in ("node_ip", "etcd_ca_file", "status_ttl", "run_cni", "etcd_endpoints")] == [
        "nodeIP", "etcdCAFile", "statusTTL", "runCNI", "etcdEndpoints",
    ]  # fmt: skip
    for spelling in ("flag", "env", "key"):
        values = [getattr(o, spelling) for o in c.OPTIONS]
        assert len(set(values)) == len(values), spelling
    for o in c.OPTIONS:
        assert re.fullmatch(r"--[a-z0-9]+(-[a-z0-9]+)*", o.flag)
        assert re.fullmatch(r"PODNET_[A-Z0-9]+(_[A-Z0-9]+)*", o.env)
        assert re.fullmatch(r"[a-z][a-zA-Z0-9]*", o.key)
        assert o.key.lower() == o.name.replace("_", "")  # the same words


def test_names_other_programs_read_are_the_agents() -> None:
    # agentctl (--etcd-endpoints, PODNET_ETCD_ENDPOINTS, PODNET_NODE_NAME, PODNET_ETCD_TIMEOUT), the CNI plugin
    # (PODNET_CNI_SOCKET, PODNET_ETCD_ENDPOINTS, PODNET_NODE_NAME), the iptables backend detection.
    assert c.BY_NAME["iptables_backend"].env == backend.ENV
    ctl = (ROOT / "agent" / "ctl" / "main.py").read_text()
    cni = (ROOT / "cni" / "config.py").read_text() + (ROOT / "cni" / "main.py").read_text()
    for name, source in [("etcd_endpoints", ctl), ("node_name", ctl), ("etcd_timeout", ctl), ("cni_socket", cni),
                         ("etcd_endpoints", cni), ("node_name", cni)]:  # fmt: skip
        assert c.BY_NAME[name].env in source, name
    assert '"--etcd-endpoints"' in ctl
    assert c.BY_NAME["health_bind"].default == BindAddress(endpoints.DEFAULT_HOST, endpoints.DEFAULT_PORT)
    assert '"etcdEndpoints"' in cni  # the CNI network config's key: the same spelling as the agent's file


def test_every_podnet_variable_in_the_repository_is_an_option_or_foreign() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    names: set[str] = set()
    for name in files:
        path = ROOT / name
        if path.suffix in (".py", ".sh", ".md", ".yaml", ".ini", ".cfg", ".c", "") and path.is_file():
            names |= set(re.findall(r"\bPODNET_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")))
    names.discard("PODNET_VM")  # a prefix quoted in the VM tier's docs, not a variable
    names.discard("PODNET_SYNC_PERIDO")  # the misspelling the config docs and tests show being refused
    assert {"PODNET_CNI_FALLBACK", "PODNET_ETCD_ENDPOINTS"} <= names
    stray = sorted(n for n in names if n not in c.BY_ENV and not c.FOREIGN_ENV.fullmatch(n))
    assert stray == [], "add these to OPTIONS or FOREIGN_ENV in daemon/config.py"


def test_the_docs_table_is_generated_from_the_definitions() -> None:
    text = config_doc.DOC.read_text()
    assert config_doc.render_doc(text) == text, "run: .venv/bin/python -m daemon.config_doc"
    assert config_doc.main(["--check"]) == 0
    for o in c.OPTIONS:
        assert f"| `{o.key}` | `{o.flag}`" in text


def test_a_stale_table_is_noticed() -> None:
    stale = config_doc.render_doc(config_doc.DOC.read_text()).replace("`--sync-period`", "`--sync`")
    assert config_doc.render_doc(stale) != stale
