"""Fixtures every suite reuses: a real etcd server, a clean datastore per test, network-namespace beds, and a
session-end check that nothing (namespace, root-namespace link, child process) leaked."""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Iterator

import pytest

from datastore.etcd import EtcdClient
from testbed import procs
from testbed.etcd_server import EtcdServer
from testbed.netns import RUN_PREFIX, NetnsBed, leftover_namespaces, leftover_root_links

SESSION_ID = secrets.token_hex(2)
SESSION_PREFIX = f"{RUN_PREFIX}{SESSION_ID}"
_bed_ids = itertools.count()


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    server = EtcdServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd(etcd_server: EtcdServer) -> Iterator[EtcdClient]:
    """A client on an empty datastore (the server is shared by the session; each test starts clean)."""
    if etcd_server.proc is None:  # a previous test stopped it and failed before restarting
        etcd_server.start()
    client = EtcdClient([etcd_server.endpoint])
    client.delete_prefix("/")
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def netns_bed() -> Iterator[NetnsBed]:
    bed = NetnsBed(run_id=f"{SESSION_ID}{next(_bed_ids)}")
    try:
        yield bed
    finally:
        bed.close()


def kernel_has_ipip() -> bool:
    """IPIP counts as present only if the kernel already has it (built in or loaded): loading the module here would
    create a tunl0 in the machine's own namespace. The VM tier's guest loads it at boot."""
    return os.path.isdir("/sys/module/ipip")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if kernel_has_ipip():
        return
    skip = pytest.mark.skip(
        reason="needs kernel IPIP (tunl0), which this kernel lacks: runs in the VM tier (tox -e vm)"
    )
    for item in items:
        if item.get_closest_marker("needs_ipip") is not None:
            item.add_marker(skip)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leaks: list[str] = []
    namespaces = leftover_namespaces([SESSION_PREFIX])
    if namespaces:
        leaks.append(f"network namespaces: {namespaces}")
    links = leftover_root_links([SESSION_PREFIX, "cali"])
    if links:
        leaks.append(f"links in the root namespace: {links}")
    children = procs.leaked_children()
    if children:
        leaks.append(f"child processes: {children}")
        procs.kill_registered()
    if leaks:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        msg = "LEAK CHECK FAILED: " + "; ".join(leaks)
        if reporter is not None:
            reporter.write_line(msg, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
