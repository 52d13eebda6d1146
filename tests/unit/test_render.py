"""Golden text of the iptables-restore and ipset restore input the dataplane writers produce."""

from __future__ import annotations

import pytest

from agent.calc.state import Chain, DataplaneState, IpSet, KernelJump
from agent.dataplane.backend import choose
from agent.dataplane.iptables import is_commit_contention
from agent.dataplane.render import (
    KernelSet,
    RenderError,
    check_names,
    needs_retype,
    normalize_member,
    parse_ipset_save,
    parse_save,
    plain_hash,
    plan_ipsets,
    plan_table,
    referencing_chains,
    retype_ipset_texts,
    rewrite_chains,
    rule_hashes,
    temp_name,
)
from agent.dataplane.statefile import StateFileError, from_json, to_json

FWD = KernelJump("filter", "FORWARD", "-m comment --comment podnet -j podnet-FORWARD")
CHAINS = {
    "podnet-FORWARD": Chain(
        "podnet-FORWARD",
        ("-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT", "-o cali+ -j podnet-to-wl"),
    ),
    "podnet-to-wl": Chain("podnet-to-wl", ("-m set --match-set podnet-s-web src -j ACCEPT", "-j DROP")),
}


def plan(current=None, builtin=None, delete_stale=False, chains=CHAINS, jumps=(FWD,)):
    return plan_table(
        "filter",
        desired=chains,
        jumps=jumps,
        current_chains=current or {},
        builtin=builtin if builtin is not None else {"FORWARD": []},
        delete_stale=delete_stale,
    )


def test_first_sync_golden_text() -> None:
    h1, h2 = rule_hashes(CHAINS["podnet-FORWARD"])
    h3, h4 = rule_hashes(CHAINS["podnet-to-wl"])
    assert plan().text == (
        "*filter\n"
        ":podnet-FORWARD - [0:0]\n"
        ":podnet-to-wl - [0:0]\n"
        f'-A podnet-FORWARD -m comment --comment "podnet:{h1}" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n'
        f'-A podnet-FORWARD -m comment --comment "podnet:{h2}" -o cali+ -j podnet-to-wl\n'
        f'-A podnet-to-wl -m comment --comment "podnet:{h3}" -m set --match-set podnet-s-web src -j ACCEPT\n'
        f'-A podnet-to-wl -m comment --comment "podnet:{h4}" -j DROP\n'
        "-I FORWARD 1 -m comment --comment podnet -j podnet-FORWARD\n"
        "COMMIT\n"
    )


def test_hashes_chain_over_name_and_previous_rules() -> None:
    a = rule_hashes(Chain("podnet-a", ("-j ACCEPT", "-j DROP")))
    assert len(set(a)) == 2 and all(len(h) == 16 for h in a)
    assert rule_hashes(Chain("podnet-b", ("-j ACCEPT", "-j DROP"))) != a  # name is part of it
    assert rule_hashes(Chain("podnet-a", ("-j DROP",)))[0] != a[1]  # position is part of it
    assert rule_hashes(Chain("podnet-a", ("-j ACCEPT", "-j REJECT")))[0] == a[0]


def test_only_changed_chains_are_written() -> None:
    current = {name: rule_hashes(c) for name, c in CHAINS.items()}
    jump_ok = {"FORWARD": ["-m comment --comment podnet -j podnet-FORWARD", "-j DOCKER-USER"]}
    assert plan(current, jump_ok).text == ""
    changed = dict(CHAINS, **{"podnet-to-wl": Chain("podnet-to-wl", ("-j DROP",))})
    p = plan(current, jump_ok, chains=changed)
    assert p.chains_written == ("podnet-to-wl",)
    h = rule_hashes(changed["podnet-to-wl"])[0]
    assert (
        p.text == f'*filter\n:podnet-to-wl - [0:0]\n-A podnet-to-wl -m comment --comment "podnet:{h}" -j DROP\nCOMMIT\n'
    )


def test_drifted_chain_is_rewritten() -> None:
    current = {name: rule_hashes(c) for name, c in CHAINS.items()}
    current["podnet-to-wl"] = (*current["podnet-to-wl"][:1], "", current["podnet-to-wl"][1])  # a rule by hand
    jump_ok = {"FORWARD": ["-m comment --comment podnet -j podnet-FORWARD"]}
    assert plan(current, jump_ok).chains_written == ("podnet-to-wl",)


def test_jump_moved_back_to_the_top_without_naming_foreign_rules() -> None:
    current = {name: rule_hashes(c) for name, c in CHAINS.items()}
    builtin = {"FORWARD": ["-j KUBE-FORWARD", "-m comment --comment podnet -j podnet-FORWARD"]}
    p = plan(current, builtin)
    assert p.jumps_fixed == ("FORWARD",)
    assert p.text == (
        "*filter\n"
        "-D FORWARD -m comment --comment podnet -j podnet-FORWARD\n"
        "-I FORWARD 1 -m comment --comment podnet -j podnet-FORWARD\n"
        "COMMIT\n"
    )


def test_duplicate_jumps_are_collapsed_to_one() -> None:
    current = {name: rule_hashes(c) for name, c in CHAINS.items()}
    j = "-m comment --comment podnet -j podnet-FORWARD"
    p = plan(current, {"FORWARD": [j, "-j ACCEPT", j]})
    assert p.text.count(f"-D FORWARD {j}\n") == 2
    assert p.text.count(f"-I FORWARD 1 {j}\n") == 1


def test_stale_chains_and_jumps_only_removed_when_asked() -> None:
    current = {name: rule_hashes(c) for name, c in CHAINS.items()}
    current["podnet-old"] = ("abc",)
    builtin = {
        "FORWARD": ["-m comment --comment podnet -j podnet-FORWARD"],
        "INPUT": ["-j KUBE-FIREWALL", '-m comment --comment "old podnet" -j podnet-INPUT'],
    }
    left = plan(current, builtin)
    assert left.text == "" and left.stale_found == 2  # podnet-old and the INPUT jump: seen, left for cleanup
    p = plan(current, builtin, delete_stale=True)
    assert p.stale_found == 0
    assert p.chains_deleted == ("podnet-old",)
    assert p.text == (
        "*filter\n"
        ":podnet-old - [0:0]\n"
        '-D INPUT -m comment --comment "old podnet" -j podnet-INPUT\n'
        "-X podnet-old\n"
        "COMMIT\n"
    )


def test_parse_save_reads_hashes_and_builtin_chains() -> None:
    text = """# Generated by iptables-save
*filter
:INPUT ACCEPT [10:20]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:podnet-a - [0:0]
:podnet-empty - [0:0]
-A FORWARD -m comment --comment podnet -j podnet-a
-A FORWARD -j KUBE-SERVICES
-A podnet-a -p tcp -m comment --comment "podnet:00ff00ff00ff00ff" -m tcp --dport 80 -j ACCEPT
-A podnet-a -j DROP
-A KUBE-SERVICES -j RETURN
COMMIT
"""
    view = parse_save(text)["filter"]
    # a rule without our hash is known by its text (plain_hash), which never equals a chained hash
    assert view.chains == {"podnet-a": ("00ff00ff00ff00ff", plain_hash("-j DROP")), "podnet-empty": ()}
    assert view.builtin == {
        "INPUT": [],
        "FORWARD": ["-m comment --comment podnet -j podnet-a", "-j KUBE-SERVICES"],
        "OUTPUT": [],
    }


def test_bad_names_are_refused() -> None:
    with pytest.raises(RenderError, match="must start with"):
        check_names({"filter": {"KUBE-X": Chain("KUBE-X")}}, [])
    with pytest.raises(RenderError, match="28"):
        check_names({"filter": {"podnet-" + "x" * 30: Chain("x")}}, [])
    with pytest.raises(RenderError, match="31"):
        check_names({}, ["podnet-" + "y" * 30])
    with pytest.raises(RenderError, match="table"):
        check_names({"security2": {}}, [])
    with pytest.raises(RenderError, match="built-in"):
        plan(jumps=(KernelJump("filter", "PREROUTING", "-j podnet-x"),))


def test_ipset_first_sync_and_deltas() -> None:
    desired = {
        "podnet-s-web": IpSet("podnet-s-web", "hash:ip", frozenset({"10.244.1.2", "10.244.1.3"})),
        "podnet-n-out": IpSet(
            "podnet-n-out", "hash:net", frozenset({"198.51.100.0/24", "198.51.100.7/32 nomatch", "0.0.0.0/1"})
        ),
    }
    p = plan_ipsets(desired, {}, delete_stale=False)
    assert p.text == (
        "create podnet-n-out hash:net family inet hashsize 1024 maxelem 65536\n"
        "add podnet-n-out 0.0.0.0/1\n"
        "add podnet-n-out 198.51.100.0/24\n"
        "add podnet-n-out 198.51.100.7 nomatch\n"
        "create podnet-s-web hash:ip family inet hashsize 1024 maxelem 65536\n"
        "add podnet-s-web 10.244.1.2\n"
        "add podnet-s-web 10.244.1.3\n"
    )
    current = dict(p.written)
    current["podnet-stale"] = KernelSet("podnet-stale", "hash:ip", "inet", 65536, frozenset())
    desired["podnet-s-web"] = IpSet("podnet-s-web", "hash:ip", frozenset({"10.244.1.3", "10.244.1.4"}))
    p2 = plan_ipsets(desired, current, delete_stale=False)
    assert p2.text == "del podnet-s-web 10.244.1.2\nadd podnet-s-web 10.244.1.4\n"
    assert p2.destroy_text == ""
    assert p2.stale_found == 1
    assert plan_ipsets(desired, current, delete_stale=True).destroy_text == "destroy podnet-stale\n"
    # Sets known to be as last written are trusted without comparing members.
    p3 = plan_ipsets(desired, current, delete_stale=False, unchanged=frozenset({"podnet-s-web", "podnet-n-out"}))
    assert p3.text == "" and p3.written["podnet-s-web"] == current["podnet-s-web"]


def test_ipset_growth_rebuilds_with_swap_and_type_change_is_refused() -> None:
    current = {"podnet-s-a": KernelSet("podnet-s-a", "hash:ip", "inet", 4, frozenset({"10.0.0.1"}))}
    desired = {"podnet-s-a": IpSet("podnet-s-a", "hash:ip", frozenset(f"10.0.0.{i}" for i in range(1, 6)))}
    p = plan_ipsets(desired, current, delete_stale=False)
    tmp = temp_name("podnet-s-a")
    assert len(tmp) <= 31 and tmp.startswith("podnet-")
    assert p.rebuilt == ("podnet-s-a",)
    adds = "".join(f"add {tmp} 10.0.0.{i}\n" for i in range(1, 6))
    assert p.text == (
        f"create {tmp} hash:ip family inet hashsize 1024 maxelem 65536\nflush {tmp}\n"
        f"{adds}swap {tmp} podnet-s-a\ndestroy {tmp}\n"
    )
    big = {"podnet-s-a": IpSet("podnet-s-a", "hash:ip", frozenset(f"10.1.{i >> 8}.{i & 255}" for i in range(70000)))}
    p = plan_ipsets(big, current, delete_stale=False)
    assert p.rebuilt == ("podnet-s-a",) and "maxelem 262144" in p.text
    for other in ("hash:net", "hash:ip,port"):
        with pytest.raises(RenderError, match="new name"):
            plan_ipsets({"podnet-s-a": IpSet("podnet-s-a", other, frozenset())}, current, delete_stale=False)


def test_retype_moves_rules_to_a_temp_set_and_back() -> None:
    save = (
        "*filter\n:podnet-a - [0:0]\n:podnet-b - [0:0]\n"
        '-A podnet-a -m comment --comment "podnet:01" -m set --match-set podnet-s-x src -j ACCEPT\n'
        '-A podnet-a -m comment --comment "podnet:02" -j DROP\n'
        '-A podnet-b -m comment --comment "podnet:03" -m set --match-set podnet-s-xy src -j ACCEPT\n'
        "-A FORWARD -m set --match-set podnet-s-x src -j ACCEPT\nCOMMIT\n"
    )
    found = referencing_chains(save, ["podnet-s-x"])
    assert list(found) == ["podnet-a"]  # not podnet-s-xy, not a foreign rule
    tmp = temp_name("podnet-s-x")
    to_temp = rewrite_chains("filter", found, {"podnet-s-x": tmp})
    assert to_temp == (
        "*filter\n:podnet-a - [0:0]\n"
        f'-A podnet-a -m comment --comment "podnet:t01" -m set --match-set {tmp} src -j ACCEPT\n'
        '-A podnet-a -m comment --comment "podnet:t02" -j DROP\nCOMMIT\n'
    )
    # Caught between the moves, the chain reads as drifted (no hashes), so a full sync rewrites it.
    assert all(h.startswith("p") for h in parse_save(to_temp)["filter"].chains["podnet-a"])
    assert (
        rewrite_chains("filter", found, {})
        == "*filter\n:podnet-a - [0:0]\n" + "\n".join(found["podnet-a"]) + "\nCOMMIT\n"
    )
    current = {"podnet-s-x": KernelSet("podnet-s-x", "hash:ip", "inet", 65536, frozenset({"10.0.0.1"}))}
    desired = {"podnet-s-x": IpSet("podnet-s-x", "hash:net", frozenset({"10.0.0.0/24"}))}
    assert needs_retype(desired, current) == ["podnet-s-x"]
    fill, recreate, drop = retype_ipset_texts(desired, ["podnet-s-x"])
    assert (
        fill == f"create {tmp} hash:net family inet hashsize 1024 maxelem 65536\nflush {tmp}\nadd {tmp} 10.0.0.0/24\n"
    )
    assert recreate == (
        "destroy podnet-s-x\ncreate podnet-s-x hash:net family inet hashsize 1024 maxelem 65536\n"
        "add podnet-s-x 10.0.0.0/24\n"
    )
    assert drop == f"destroy {tmp}\n"


def test_ipset_save_round_trip_normalises_members() -> None:
    text = (
        "create podnet-p hash:ip,port family inet hashsize 1024 maxelem 131072 bucketsize 12 initval 0x1\n"
        "add podnet-p 10.0.0.1,tcp:80\n"
        "create other hash:ip family inet hashsize 1024 maxelem 65536\n"
        "add other 1.2.3.4\n"
    )
    sets = parse_ipset_save(text)
    assert sets == {"podnet-p": KernelSet("podnet-p", "hash:ip,port", "inet", 131072, frozenset({"10.0.0.1,tcp:80"}))}
    assert normalize_member("hash:ip,port", "10.0.0.1,TCP:80") == "10.0.0.1,tcp:80"
    desired = {"podnet-p": IpSet("podnet-p", "hash:ip,port", frozenset({"10.0.0.1,TCP:80"}))}
    assert plan_ipsets(desired, sets, delete_stale=True).text == ""


def test_backend_choice_follows_kube_hints_then_rule_counts() -> None:
    assert choose("", "") == "nft"
    assert choose("*filter\n-A FORWARD -j X\n-A INPUT -j Y\n", "*filter\n-A FORWARD -j Z\n") == "legacy"
    assert choose("*filter\n-A FORWARD -j X\n-A INPUT -j Y\n", "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\n") == "nft"
    assert choose("*mangle\n:KUBE-KUBELET-CANARY - [0:0]\n", "*filter\n-A FORWARD -j Z\n") == "legacy"


def test_only_commit_contention_counts_as_retryable() -> None:
    text = "*filter\n:podnet-a - [0:0]\n-A podnet-a -j ACCEPT\nCOMMIT\n"
    assert is_commit_contention("iptables-restore: line 4 failed", text)
    assert is_commit_contention("Another app is currently holding the xtables lock.", text)
    assert not is_commit_contention("iptables-restore: line 3 failed", text)
    assert not is_commit_contention("line 4: CHAIN_DEL failed (Device or resource busy): chain podnet-c", text)
    assert not is_commit_contention("Set nosuch doesn't exist.\n\nError occurred at line: 3", text)


def test_state_file_round_trip_and_bad_input() -> None:
    state = DataplaneState(
        ipsets={"podnet-s-web": IpSet("podnet-s-web", "hash:ip", frozenset({"10.244.1.2"}))},
        tables={"filter": CHAINS},
        jumps=(FWD,),
    )
    assert from_json(to_json(state)) == state
    with pytest.raises(StateFileError, match="not a dataplane state"):
        from_json("{not json")
    with pytest.raises(StateFileError, match="type"):
        from_json('{"ipsets": [{"name": "podnet-x", "type": "hash:mac", "members": []}]}')


def test_big_sets_are_created_near_their_final_hash_size() -> None:
    members = frozenset(f"10.244.{i >> 8}.{i & 255}" for i in range(20000))
    p = plan_ipsets({"podnet-s-big": IpSet("podnet-s-big", "hash:ip", members)}, {}, delete_stale=False)
    assert p.text.startswith("create podnet-s-big hash:ip family inet hashsize 16384 maxelem 65536\n")
    small = plan_ipsets({"podnet-s-s": IpSet("podnet-s-s", "hash:ip", frozenset({"10.0.0.1"}))}, {}, False)
    assert "hashsize 1024 " in small.text
    assert normalize_member("hash:ip,port", "10.0.0.1,TCP:80") == "10.0.0.1,tcp:80"
    assert normalize_member("hash:ip,port", "10.0.0.1,udp:53") == "10.0.0.1,udp:53"


def test_a_plain_chain_is_written_without_comments_and_known_by_its_text() -> None:
    plain = Chain("podnet-FORWARD", ("-i cali+ -j podnet-x", "-o cali+ -j ACCEPT"), hashed=False)
    plan = plan_table(
        "filter", desired={plain.name: plain}, jumps=(), current_chains={}, builtin={}, delete_stale=False
    )
    assert "-A podnet-FORWARD -i cali+ -j podnet-x\n-A podnet-FORWARD -o cali+ -j ACCEPT\n" in plan.text
    saved = (
        "*filter\n:podnet-FORWARD - [0:0]\n"
        "-A podnet-FORWARD -i cali+ -j podnet-x\n-A podnet-FORWARD -o cali+ -j ACCEPT\nCOMMIT\n"
    )
    assert parse_save(saved)["filter"].chains["podnet-FORWARD"] == rule_hashes(plain)
    edited = saved.replace("-j ACCEPT", "-j DROP")
    assert parse_save(edited)["filter"].chains["podnet-FORWARD"] != rule_hashes(plain)
