"""The agent's configuration: each source and the precedence (flags > PODNET_* environment > config file > cluster
config > defaults), the source of every value, and the messages a bad or unknown setting gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from daemon import config as c
from daemon.config import ConfigError, resolve
from daemon.config_values import BindAddress
from datastore import model as m

HOST = "worker-7"
IN_FILE = f"config file {c.DEFAULT_CONFIG_FILE}"


def run(
    flags: dict[str, object] | None = None,
    env: dict[str, str] | None = None,
    file: str | None = None,
    cluster: m.ClusterConfig | None = None,
) -> c.Resolved:
    return resolve(flags or {}, env or {}, file, cluster, hostname=HOST)


def source(resolved: c.Resolved, name: str) -> str:
    return str(resolved.sources[name])


def test_defaults_and_their_sources() -> None:
    got = run()
    cfg = got.config
    assert cfg.node_name == HOST and source(got, "node_name") == "host name"
    assert cfg.node_ip.text == "first-found"
    assert cfg.etcd_endpoints == ("127.0.0.1:2379",)
    assert cfg.etcd_timeout == 5.0
    assert (cfg.run_router, cfg.run_firewall, cfg.run_cni) == (True, True, True)
    assert cfg.health_bind == BindAddress("127.0.0.1", 9099)
    assert (cfg.sync_period, cfg.cache_sync_timeout) == (300.0, 60.0)
    assert (cfg.log_level, cfg.log_format) == ("info", "text")
    assert (cfg.bgp_hold_time, cfg.bgp_graceful_restart_time) == (90, 120)
    assert cfg.cni_socket == Path("/run/podnet/cni.sock")
    assert cfg.as_number is None and cfg.etcd_ca_file is None and cfg.netns is None
    assert all(str(s) == "default" for n, s in got.sources.items() if n != "node_name")
    assert cfg == c.AgentConfig(node_name=HOST)  # the dataclass's defaults are the option table's


def test_each_source_and_the_precedence() -> None:
    cluster = m.ClusterConfig(log_level="debug")
    flags: dict[str, object] = {"sync_period": "10s", "log_level": "error"}
    env = {"PODNET_SYNC_PERIOD": "20s", "PODNET_LOG_LEVEL": "warning"}
    file = "syncPeriod: 30s\nlogLevel: info\n"
    for_each = [
        (flags, env, file, cluster, 10.0, "flag --sync-period", "error", "flag --log-level"),
        ({}, env, file, cluster, 20.0, "environment PODNET_SYNC_PERIOD", "warning", "environment PODNET_LOG_LEVEL"),
        ({}, {}, file, cluster, 30.0, IN_FILE, "info", IN_FILE),
        ({}, {}, None, cluster, 300.0, "default", "debug", "cluster config logLevel"),
        ({}, {}, None, None, 300.0, "default", "info", "default"),
    ]  # fmt: skip
    for f, e, text, cl, period, period_source, level, level_source in for_each:
        got = resolve(f, e, text, cl, hostname=HOST)
        assert (got.config.sync_period, source(got, "sync_period")) == (period, period_source)
        assert (got.config.log_level, source(got, "log_level")) == (level, level_source)


def test_the_cluster_config_sets_only_what_it_has() -> None:
    got = run(cluster=m.ClusterConfig(log_level="warning", as_number=65001))
    assert [n for n, s in got.sources.items() if s.kind == c.CLUSTER] == ["log_level"]
    assert got.config.as_number is None  # the cluster AS stays the cluster's, not frozen into the node's config


def test_node_name_sources() -> None:
    file = "nodeName: from-file\n"
    env = {"PODNET_NODE_NAME": "from-podnet-env", "NODE_NAME": "from-downward-api"}
    assert run({"node_name": "from-flag"}, env, file).config.node_name == "from-flag"
    got = run({}, env, file)
    assert (got.config.node_name, source(got, "node_name")) == ("from-podnet-env", "environment PODNET_NODE_NAME")
    got = run({}, {"NODE_NAME": "from-downward-api"}, file)
    assert (got.config.node_name, source(got, "node_name")) == ("from-downward-api", "environment NODE_NAME")
    assert run({}, {}, file).config.node_name == "from-file"
    assert resolve({}, {}, None, hostname="Worker-7.Example.COM").config.node_name == "worker-7.example.com"
    with pytest.raises(
        ConfigError, match=r"host name: 'my_host' is not a valid node name .* set --node-name or NODE_NAME"
    ):
        resolve({}, {}, None, hostname="my_host")
    with pytest.raises(ConfigError, match=r"environment NODE_NAME: 'Bad Name' is not a valid node name"):
        run(env={"NODE_NAME": "Bad Name"})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1h30m", 5400.0), ("250ms", 0.25), ("90", 90.0), ("2.5", 2.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert run(env={"PODNET_SYNC_PERIOD": text}).config.sync_period == seconds


def test_durations_in_the_file_may_be_numbers_of_seconds() -> None:
    got = run(file="syncPeriod: 45\ncacheSyncTimeout: 1.5\nstatusTTL: 1m\nbgpHoldTime: 0\n").config
    assert (got.sync_period, got.cache_sync_timeout, got.status_ttl, got.bgp_hold_time) == (45.0, 1.5, 60, 0)


@pytest.mark.parametrize(
    ("flags", "env", "file", "message"),
    [
        ({}, {"PODNET_SYNC_PERIOD": "soon"}, None,
         "environment PODNET_SYNC_PERIOD: 'soon' is not a duration (e.g. 30s, 5m, 1h30m or a number of seconds)"),
        ({"sync_period": "5 minutes"}, {}, None, "flag --sync-period: '5 minutes' is not a duration"),
        ({}, {}, "syncPeriod: true\n", f"config file {c.DEFAULT_CONFIG_FILE}: syncPeriod: True is not a duration"),
        ({}, {}, "syncPeriod: -5\n", "syncPeriod: -5 is not a duration (negative or not finite)"),
        ({}, {}, "syncPeriod: 0\n", "syncPeriod: 0 is out of range (must be more than 0s)"),
        ({}, {"PODNET_STATUS_TTL": "1.5s"}, None, "environment PODNET_STATUS_TTL: '1.5s' is not a whole number"),
        ({"bgp_hold_time": "2"}, {}, None, "bgpHoldTime (flag --bgp-hold-time): must be 0 or at least 3s (RFC 4271)"),
        ({}, {}, "bgpGracefulRestartTime: 2h\n", "'2h' is out of range (must be at least 0s and at most 1h8m15s)"),
        ({}, {"PODNET_RUN_CNI": "maybe"}, None, "environment PODNET_RUN_CNI: 'maybe' is not true or false"),
        ({}, {}, "logLevel: verbose\n", "logLevel: 'verbose' is not one of debug, info, warning, error"),
        ({}, {"PODNET_LOG_FORMAT": "xml"}, None, "environment PODNET_LOG_FORMAT: 'xml' is not one of text, json"),
        ({}, {}, "asNumber: 0\n", "asNumber: 0 is out of range (1..4294967295)"),
        ({}, {"PODNET_AS_NUMBER": "64512.5"}, None, "environment PODNET_AS_NUMBER: '64512.5' is not an integer"),
        ({}, {}, "etcdEndpoints: []\n", "etcdEndpoints: no endpoint given (at least one HOST:PORT)"),
        ({"etcd_endpoints": "10.0.0.1"}, {}, None,
         "flag --etcd-endpoints: '10.0.0.1' is not an etcd endpoint (HOST:PORT, optionally http:// or https://)"),
        ({"etcd_endpoints": "10.0.0.1:2379,etcd_2:2379"}, {}, None, "'etcd_2:2379': 'etcd_2' is not a host name"),
        ({}, {"PODNET_ETCD_ENDPOINTS": "10.0.0.1:99999"}, None,
         "environment PODNET_ETCD_ENDPOINTS: '10.0.0.1:99999': '99999' is not a port (0..65535)"),
        ({}, {}, "cniSocket: run/cni.sock\n", "cniSocket: 'run/cni.sock' is not an absolute path"),
        ({}, {"PODNET_HEALTH_BIND": "9099"}, None, "environment PODNET_HEALTH_BIND: '9099' is not IP:PORT"),
        ({}, {"PODNET_HEALTH_BIND": "localhost:9099"}, None, "'localhost' is not an IP address"),
        ({}, {"PODNET_HEALTH_BIND": "::1:9099"}, None, "write an IPv6 address in brackets"),
        ({}, {}, "nodeIP: interface=eth(\n",
         f"config file {c.DEFAULT_CONFIG_FILE}: nodeIP: 'interface=eth(': 'eth(' is not a regular expression"),
        ({}, {}, "exabgpReactorSpeed: 0\n", "exabgpReactorSpeed: 0 is not a positive number"),
    ],
)  # fmt: skip
def test_bad_values_name_their_source(
    flags: dict[str, object], env: dict[str, str], file: str | None, message: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        run(flags, env, file)
    assert message in str(exc.value)


def test_unknown_file_keys_are_refused_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as exc:
        resolve({}, {}, "etcd_endpoint: [10.0.0.1:2379]\n", file_path="/etc/podnet/agent.yaml", hostname=HOST)
    assert (
        str(exc.value)
        == "config file /etc/podnet/agent.yaml: unknown key 'etcd_endpoint' (did you mean 'etcdEndpoints'?)"
    )
    with pytest.raises(ConfigError, match=r"unknown key 'sync_period' \(did you mean 'syncPeriod'\?\)"):
        run(file="sync_period: 5m\n")
    with pytest.raises(ConfigError, match=r"unknown key 'colour'$"):
        run(file="colour: blue\n")


def test_malformed_files() -> None:
    with pytest.raises(ConfigError, match=r"config file /x.yaml: expected a mapping of options, found list"):
        resolve({}, {}, "- a\n- b\n", file_path="/x.yaml", hostname=HOST)
    with pytest.raises(ConfigError, match=r"config file /x.yaml: not valid YAML: "):
        resolve({}, {}, "syncPeriod: [5m\n", file_path="/x.yaml", hostname=HOST)
    assert run(file="").sources["sync_period"].kind == c.DEFAULT
    assert run(file="# nothing set\n").sources["sync_period"].kind == c.DEFAULT


def test_unknown_podnet_variables_are_refused_but_other_programs_ones_are_not() -> None:
    with pytest.raises(ConfigError) as exc:
        run(env={"PODNET_SYNC_PERIDO": "5m"})
    assert (
        str(exc.value) == "environment PODNET_SYNC_PERIDO: not a podnet-agent option (did you mean PODNET_SYNC_PERIOD?)"
    )
    foreign = {
        "PODNET_CNI_FALLBACK": "podnet-cni", "PODNET_TEST_MISSING_MATCH": "sctp", "PODNET_VM_CACHE": "/x",
        "PODNET_SERVICE_HOST": "10.96.0.9", "PODNET_PORT_9099_TCP_ADDR": "10.96.0.9", "PODNET_CONFIG": "/c.yaml",
        "HOME": "/root", "ETCD_ENDPOINTS": "ignored",
    }  # fmt: skip
    assert run(env=foreign).config == run().config


def test_an_empty_variable_counts_as_unset() -> None:
    got = run(env={"PODNET_SYNC_PERIOD": "", "NODE_NAME": " "}, file="syncPeriod: 1m\n")
    assert (got.config.sync_period, got.config.node_name) == (60.0, HOST)


def test_booleans_and_lists_from_every_source() -> None:
    got = run({"run_cni": False}, {"PODNET_RUN_FIREWALL": "no"}, "runRouter: false\n")
    assert (got.config.run_router, got.config.run_firewall, got.config.run_cni) == (False, False, False)
    for text in ("true", "Yes", "1", "on"):
        assert run(env={"PODNET_BGP_WITHDRAW_ON_EXIT": text}).config.bgp_withdraw_on_exit is True
    eps = ("10.0.0.1:2379", "https://etcd-2.example.com:2379", "[fd00::3]:2379")
    assert (
        run(
            env={"PODNET_ETCD_ENDPOINTS": " 10.0.0.1:2379, https://etcd-2.example.com:2379,[fd00::3]:2379 "}
        ).config.etcd_endpoints
        == eps
    )
    assert run(file=yaml.safe_dump({"etcdEndpoints": list(eps)})).config.etcd_endpoints == eps
    assert run(file="etcdEndpoints: 10.0.0.1:2379,10.0.0.2:2379\n").config.etcd_endpoints == (
        "10.0.0.1:2379",
        "10.0.0.2:2379",
    )


def test_etcd_tls_files_go_together() -> None:
    tls = {"PODNET_ETCD_CERT_FILE": "/etc/podnet/tls/cert.pem", "PODNET_ETCD_KEY_FILE": "/etc/podnet/tls/key.pem"}
    got = run(env={**tls, "PODNET_ETCD_CA_FILE": "/etc/podnet/tls/ca.pem", "PODNET_ETCD_ENDPOINTS": "https://e:2379"})
    assert got.config.etcd_tls and got.config.etcd_key_file == Path("/etc/podnet/tls/key.pem")
    with pytest.raises(ConfigError) as exc:
        run(flags={"etcd_cert_file": "/c.pem"})
    assert str(exc.value) == "etcdCertFile (flag --etcd-cert-file) is set but etcdKeyFile is not: the two go together"
    with pytest.raises(ConfigError, match=r"etcdKeyFile \(config file .*\) is set but etcdCertFile is not"):
        run(file="etcdKeyFile: /k.pem\n")
    with pytest.raises(ConfigError) as exc:
        run(env={"PODNET_ETCD_CA_FILE": "/ca.pem", "PODNET_ETCD_ENDPOINTS": "http://127.0.0.1:2379"})
    assert str(exc.value) == (
        "etcdEndpoints (environment PODNET_ETCD_ENDPOINTS): http://127.0.0.1:2379 is plain HTTP, but TLS files are "
        "set (etcdCAFile (environment PODNET_ETCD_CA_FILE))"
    )
    # A flag's empty value unsets what a lower source set.
    assert run({"etcd_ca_file": ""}, file="etcdCAFile: /ca.pem\n").config.etcd_ca_file is None


def test_render_text_and_json_with_sources() -> None:
    got = run({"sync_period": "90s"}, {"NODE_NAME": "n1"}, "logFormat: json\n", m.ClusterConfig(log_level="debug"))
    text = c.render(got)
    lines = text.splitlines()
    assert lines[0].split() == ["OPTION", "VALUE", "SOURCE"]
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in lines[1:]}
    assert rows["syncPeriod"] == ["1m30s", "flag --sync-period"]
    assert rows["nodeName"] == ["n1", "environment NODE_NAME"]
    assert rows["logFormat"] == ["json", f"config file {c.DEFAULT_CONFIG_FILE}"]
    assert rows["logLevel"] == ["debug", "cluster config logLevel"]
    assert rows["asNumber"] == ["-", "default"]
    assert rows["healthBind"] == ["127.0.0.1:9099", "default"]
    assert len(rows) == len(c.OPTIONS)
    data = json.loads(c.render(got, "json"))
    assert list(data) == [o.key for o in c.OPTIONS]
    assert data["syncPeriod"] == {"value": 90.0, "source": "flag --sync-period"}
    assert data["etcdEndpoints"] == {"value": ["127.0.0.1:2379"], "source": "default"}
    assert data["runCNI"] == {"value": True, "source": "default"}
    assert data["asNumber"] == {"value": None, "source": "default"}
    assert c.log_lines(got)[0] == "nodeName=n1 (environment NODE_NAME)"


def test_the_json_values_are_a_config_file_that_gives_the_same_config() -> None:
    got = run(
        {"node_ip": "cidr=192.168.77.0/24", "as_number": "65010", "health_bind": "[::1]:0"},
        {"PODNET_ETCD_ENDPOINTS": "https://a:2379,https://b:2379", "PODNET_ETCD_CA_FILE": "/ca.pem"},
        "statusTTL: 30\nworkdir: /var/lib/podnet\nexabgpLogLevel: debug\nrunCNI: false\nnetns: lab-n1\n",
    )
    data = json.loads(c.render(got, "json"))
    as_file = yaml.safe_dump({k: d["value"] for k, d in data.items()})  # null: unset
    again = run(file=as_file)
    assert again.config == got.config
    assert again.config.health_bind == BindAddress("::1", 0) and again.config.exabgp_log_level == "DEBUG"
