"""Pure rendering: desired ``DataplaneState`` + what the kernel holds → ``iptables-restore`` and ``ipset restore``
input containing only what changed.

Every rule we write carries a comment ``podnet:<hash>``; the hash chains over the chain name and all rules up to
and including this one (as Felix does). Reading the hashes back from ``iptables-save`` tells, without parsing
iptables' normalised rule text, whether a chain is exactly what we want: a rule added, edited or deleted by hand
breaks the sequence and the chain is rewritten on the next full resync.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from agent.calc.state import Chain, IpSet, KernelJump

OWNED_PREFIX = "podnet-"
HASH_TAG = "podnet:"
MAX_CHAIN_NAME = 28
MAX_SET_NAME = 31
DEFAULT_MAXELEM = 65536
# Built-in chains per table; a podnet jump may only live in these.
BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}
_HASH_RE = re.compile(r'--comment "?' + re.escape(HASH_TAG) + r'([0-9a-f]+)"?')
_TARGET_RE = re.compile(r"(?:^|\s)-[jg] (\S+)")


class RenderError(ValueError):
    """The desired state cannot be written as asked (bad name, unknown table, incompatible ipset change)."""


# ---------------------------------------------------------------------------------------------------------------
# iptables


@functools.lru_cache(maxsize=32768)  # chains rarely change between syncs; sha256 of every rule is the hot part
def rule_hashes(chain: Chain) -> tuple[str, ...]:
    if not chain.hashed:
        return tuple(plain_hash(rule) for rule in chain.rules)
    out: list[str] = []
    prev = chain.name
    for rule in chain.rules:
        prev = hashlib.sha256(f"{prev}\0{rule}".encode()).hexdigest()[:16]
        out.append(prev)
    return tuple(out)


def plain_hash(rule: str) -> str:
    """The identity of a rule without a hash comment: its text as iptables-save prints it. Never equal to a chained
    hash (those are hex only), so a foreign rule in a hashed chain still reads as drift."""
    return "p" + hashlib.sha256(rule.encode()).hexdigest()[:15]


@dataclass
class TableView:
    """What one table holds, as far as podnet cares: each owned chain's rule hashes (``plain_hash`` of its text for
    a rule that carries no hash of ours), and the rules of the built-in chains (``-A CHAIN`` stripped)."""

    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    builtin: dict[str, list[str]] = field(default_factory=dict)


def parse_save(text: str) -> dict[str, TableView]:
    """Parse ``iptables-save`` output (one or more tables)."""
    views: dict[str, TableView] = {}
    view: TableView | None = None
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            view = views.setdefault(table, TableView())
        elif view is None or not line or line.startswith("#"):
            continue
        elif line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if name.startswith(OWNED_PREFIX):
                view.chains.setdefault(name, ())
            elif name in BUILTIN_CHAINS.get(table, ()):
                view.builtin.setdefault(name, [])
        elif line.startswith("-A "):
            _, name, rest = [*line.split(" ", 2), ""][:3]
            if name.startswith(OWNED_PREFIX):
                m = _HASH_RE.search(rest)
                view.chains[name] = (*view.chains.get(name, ()), m.group(1) if m else plain_hash(rest))
            elif name in BUILTIN_CHAINS.get(table, ()):
                view.builtin.setdefault(name, []).append(rest)
    return views


def parse_chain_listing(text: str) -> list[str]:
    """Rules of one chain from ``iptables -S CHAIN`` (the ``-P``/``-N`` line dropped, ``-A CHAIN`` stripped)."""
    rules = []
    for line in text.splitlines():
        if line.startswith("-A "):
            parts = line.split(" ", 2)
            rules.append(parts[2] if len(parts) > 2 else "")
    return rules


def rule_target(rule: str) -> str | None:
    m = _TARGET_RE.search(rule)
    return m.group(1) if m else None


def is_our_jump(rule: str) -> bool:
    target = rule_target(rule)
    return target is not None and target.startswith(OWNED_PREFIX)


def _same_rule(a: str, b: str) -> bool:
    try:
        return shlex.split(a) == shlex.split(b)
    except ValueError:
        return a == b


def check_names(tables: Mapping[str, Mapping[str, Chain]], ipsets: Iterable[str]) -> None:
    for table, chains in tables.items():
        if table not in BUILTIN_CHAINS:
            raise RenderError(f"unknown iptables table {table!r}")
        for name in chains:
            if not name.startswith(OWNED_PREFIX) or len(name) > MAX_CHAIN_NAME or " " in name:
                raise RenderError(f"chain name {name!r} must start with {OWNED_PREFIX!r}, ≤ {MAX_CHAIN_NAME} chars")
    for name in ipsets:
        if not name.startswith(OWNED_PREFIX) or len(name) > MAX_SET_NAME or " " in name:
            raise RenderError(f"ipset name {name!r} must start with {OWNED_PREFIX!r}, ≤ {MAX_SET_NAME} chars")


@dataclass(frozen=True)
class TablePlan:
    table: str
    text: str  # iptables-restore input; "" when nothing is to be written
    chains_written: tuple[str, ...]
    chains_deleted: tuple[str, ...]
    jumps_fixed: tuple[str, ...]  # built-in chains whose podnet jump was (re)inserted or removed
    stale_found: int = 0  # stale chains and jumps seen and left in place (delete_stale False)
    jump_lines: tuple[str, ...] = ()  # the -D/-I lines of the built-in chains in ``text`` (kept for narrowing)


def chain_lines(chain: Chain) -> list[str]:
    """The ``-A`` lines that fill ``chain`` (each with its hash comment unless the chain is plain)."""
    if not chain.hashed:
        return [f"-A {chain.name} {rule}" for rule in chain.rules]
    return [
        f'-A {chain.name} -m comment --comment "{HASH_TAG}{h}" {rule}'
        for rule, h in zip(chain.rules, rule_hashes(chain), strict=True)
    ]


def transaction(table: str, flush: Iterable[str], lines: Iterable[str]) -> str:
    """``iptables-restore --noflush`` input: the chains ``flush`` are created or emptied, then ``lines`` applied."""
    return "\n".join([f"*{table}", *(f":{name} - [0:0]" for name in flush), *lines, "COMMIT"]) + "\n"


# What a chain the kernel refused holds instead (until its desired content changes): nothing passes through it.
# For a policy chain the compiler's own fail-closed version follows at once (see policy_syncer.py); this is what a
# chain that cannot be written at all, even so, keeps.
REFUSED_RULE = "-j DROP"


def refused_placeholder(name: str) -> Chain:
    return Chain(name, (REFUSED_RULE,))


def chain_of_line(line: str | None) -> str | None:
    """Our chain an ``iptables-restore`` input line declares or appends to (None for any other line)."""
    if not line:
        return None
    if line.startswith(f":{OWNED_PREFIX}"):
        return line[1:].split(" ", 1)[0]
    if line.startswith(f"-A {OWNED_PREFIX}"):
        return line.split(" ", 2)[1]
    return None


def plan_table(
    table: str,
    *,
    desired: Mapping[str, Chain],
    jumps: Iterable[KernelJump],
    current_chains: Mapping[str, tuple[str, ...]],
    builtin: Mapping[str, list[str]],
    delete_stale: bool,
) -> TablePlan:
    """One ``iptables-restore --noflush`` transaction for ``table``.

    ``current_chains`` are the hashes of our chains in the kernel (or as last written); ``builtin`` the rules of the
    built-in chains as read from the kernel (a chain with a wanted jump missing there counts as empty). Our jump
    must be the only podnet rule of its built-in chain and sit at position 1; if not, our rules there are deleted
    and the jump inserted at 1, in the same transaction, so no packet sees the chain without it. Foreign rules are
    never named.
    """
    want = {name: rule_hashes(chain) for name, chain in desired.items()}
    changed = sorted(name for name, hashes in want.items() if current_chains.get(name) != hashes)
    all_stale = sorted(set(current_chains) - set(want))
    stale = all_stale if delete_stale else []
    wanted_jumps = {j.chain: j for j in jumps if j.table == table}
    for chain in wanted_jumps:
        if chain not in BUILTIN_CHAINS[table]:
            raise RenderError(f"podnet jump in {table}/{chain}: not a built-in chain")

    jump_lines: list[str] = []
    fixed: list[str] = []
    stale_jumps = 0
    for chain in sorted(set(builtin) | set(wanted_jumps)):
        rules = builtin.get(chain, [])
        ours = [r for r in rules if is_our_jump(r)]
        jump = wanted_jumps.get(chain)
        if jump is None:
            if ours and not delete_stale:
                stale_jumps += 1
            if not delete_stale or not ours:
                continue
        elif len(ours) == 1 and rules and rules[0] == ours[0] and _same_rule(ours[0], jump.rule):
            continue
        jump_lines += [f"-D {chain} {r}" for r in ours]
        if jump is not None:
            jump_lines.append(f"-I {chain} 1 {jump.rule}")
        fixed.append(chain)
    left = 0 if delete_stale else len(all_stale) + stale_jumps
    if not changed and not stale and not jump_lines:
        return TablePlan(table, "", (), (), (), left)
    lines = [line for name in changed for line in chain_lines(desired[name])]
    lines += jump_lines
    lines += [f"-X {name}" for name in stale]
    text = transaction(table, [*changed, *stale], lines)
    return TablePlan(table, text, tuple(changed), tuple(stale), tuple(fixed), left, tuple(jump_lines))


def with_jumps_reasserted(plan: TablePlan, jumps: Iterable[KernelJump]) -> TablePlan:
    """``plan`` that also deletes each of our wanted jumps of its table and inserts it first again (where the plan
    does not fix that chain already): the transaction then leaves every jump on top whatever moved it."""
    lines = plan.text.splitlines()
    assert lines and lines[-1] == "COMMIT", "a plan with text ends with COMMIT"
    extra: list[str] = []
    for jump in jumps:
        if jump.table == plan.table and jump.chain not in plan.jumps_fixed:
            extra += [f"-D {jump.chain} {jump.rule}", f"-I {jump.chain} 1 {jump.rule}"]
    return replace(plan, text="\n".join([*lines[:-1], *extra, "COMMIT"]) + "\n", jump_lines=(*plan.jump_lines, *extra))


def after_jump_fixes(
    builtin: Mapping[str, list[str]], jumps: Iterable[KernelJump], table: str, fixed: Iterable[str]
) -> dict[str, list[str]]:
    """The built-in chains of ``table`` after a transaction fixed our jumps in ``fixed``: there, our rules were
    deleted and the wanted jump inserted first (see plan_table); the other chains are as they were."""
    wanted = {j.chain: j for j in jumps if j.table == table}
    out = {chain: list(rules) for chain, rules in builtin.items()}
    for chain in fixed:
        rest = [r for r in out.get(chain, []) if not is_our_jump(r)]
        jump = wanted.get(chain)
        out[chain] = ([jump.rule] if jump is not None else []) + rest
    return out


# ---------------------------------------------------------------------------------------------------------------
# ipset


@dataclass(frozen=True)
class KernelSet:
    name: str
    type: str
    family: str
    maxelem: int
    members: frozenset[str]


def normalize_member(set_type: str, member: str) -> str:
    """The form ``ipset save`` prints: single spaces, lower-case protocol, no /32 (/128) on a host in a net set."""
    # The common cases, already canonical (the compiler writes members this way): keep 50 000-member sets cheap.
    plain = " " not in member and "/" not in member
    if plain and (set_type == "hash:ip" or (set_type == "hash:ip,port" and member.islower())):
        return member
    parts = member.split()
    if not parts:
        raise RenderError("empty ipset member")
    head, flags = parts[0], parts[1:]
    fields = head.split(",")
    out = []
    for i, value in enumerate(fields):
        if i == 0 and set_type.startswith("hash:net") and "/" in value:
            net = ipaddress.ip_network(value, strict=False)
            out.append(str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net))
        elif i == 1 and ":" in value:
            proto, port = value.split(":", 1)
            out.append(f"{proto.lower()}:{port}")
        else:
            out.append(value)
    return " ".join([",".join(out), *flags])


def parse_ipset_save(text: str) -> dict[str, KernelSet]:
    """Our sets from ``ipset save`` output."""
    meta: dict[str, tuple[str, str, int]] = {}
    members: dict[str, set[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        if parts[0] == "create" and parts[1].startswith(OWNED_PREFIX):
            opts = dict(zip(parts[3::2], parts[4::2], strict=False))
            meta[parts[1]] = (parts[2], opts.get("family", "inet"), int(opts.get("maxelem", DEFAULT_MAXELEM)))
            members.setdefault(parts[1], set())
        elif parts[0] == "add" and parts[1] in meta:
            members[parts[1]].add(" ".join(parts[2:]))
    return {
        name: KernelSet(name, t, fam, maxelem, frozenset(members[name])) for name, (t, fam, maxelem) in meta.items()
    }


def maxelem_for(n: int) -> int:
    size = DEFAULT_MAXELEM
    while size < 2 * n:
        size *= 2
    return size


def hashsize_for(n: int) -> int:
    """The hash size a set of ``n`` members is created with: the kernel's default (1024) grows by rehashing every
    member whenever a bucket overflows, which made filling a 20 000-member set twice as slow as creating it at about
    its final size (measured: 51-61 ms vs 28 ms)."""
    size = 1024
    while size < n // 2:
        size *= 2
    return size


def temp_name(name: str) -> str:
    return "podnet-t-" + hashlib.sha256(name.encode()).hexdigest()[: MAX_SET_NAME - len("podnet-t-")]


@dataclass(frozen=True)
class IpsetPlan:
    text: str  # `ipset restore -exist` input for creates, adds, deletes and rebuilds; "" when nothing to do
    destroy_text: str  # destroys of stale sets, run after iptables no longer references them
    written: dict[str, KernelSet]  # the state of every desired set after `text` succeeds
    rebuilt: tuple[str, ...]
    stale_found: int = 0  # stale sets seen and left in place (delete_stale False)


def plan_ipsets(
    desired: Mapping[str, IpSet],
    current: Mapping[str, KernelSet],
    delete_stale: bool,
    unchanged: frozenset[str] = frozenset(),
) -> IpsetPlan:
    """``unchanged``: desired sets known to be exactly as last written (their ``current`` entry is trusted without
    comparing members, which is what keeps a one-pod change cheap when sets hold tens of thousands of members)."""
    lines: list[str] = []
    written: dict[str, KernelSet] = {}
    rebuilt: list[str] = []
    for name in sorted(desired):
        if name in unchanged and name in current:
            written[name] = current[name]
            continue
        ips = desired[name]
        members = frozenset(normalize_member(ips.type, m) for m in ips.members)
        have = current.get(name)
        if have is None:
            maxelem = maxelem_for(len(members))
            hashsize = hashsize_for(len(members))
            lines.append(f"create {name} {ips.type} family {ips.family} hashsize {hashsize} maxelem {maxelem}")
            lines += [f"add {name} {m}" for m in sorted(members)]
        elif have.type == ips.type and have.family == ips.family and have.maxelem >= len(members):
            maxelem = have.maxelem
            lines += [f"del {name} {m}" for m in sorted(have.members - members)]
            lines += [f"add {name} {m}" for m in sorted(members - have.members)]
        else:
            # Rebuild beside the live set and swap, so rules referencing it never see a missing or half-filled set.
            # The kernel swaps only sets of one type and family, and cannot rename or destroy a referenced set.
            if have.type != ips.type or have.family != ips.family:
                raise RenderError(
                    f"ipset {name} cannot change from {have.type} ({have.family}) to {ips.type} ({ips.family}) in "
                    "place; the compiler must give the new set a new name"
                )
            tmp = temp_name(name)
            maxelem = maxelem_for(len(members))
            hashsize = hashsize_for(len(members))
            lines.append(f"create {tmp} {ips.type} family {ips.family} hashsize {hashsize} maxelem {maxelem}")
            lines.append(f"flush {tmp}")
            lines += [f"add {tmp} {m}" for m in sorted(members)]
            lines += [f"swap {tmp} {name}", f"destroy {tmp}"]
            rebuilt.append(name)
        written[name] = KernelSet(name, ips.type, ips.family, maxelem, members)
    all_stale = sorted(set(current) - set(desired))
    stale = all_stale if delete_stale else []
    destroy = "".join(f"destroy {name}\n" for name in stale)
    text = "\n".join(lines) + "\n" if lines else ""
    return IpsetPlan(text, destroy, written, tuple(rebuilt), 0 if delete_stale else len(all_stale))


# ---------------------------------------------------------------------------------------------------------------
# A set changing type under the same name. The kernel swaps only sets of one type and will not destroy or rename a
# set a rule references, so: fill a temporary set of the new type, point every rule naming the set at it (one
# iptables transaction), recreate the set under its name with the new type, point the rules back, drop the temp.
# Packets always meet a complete set: the old one, then the temp one, then the new one.


def needs_retype(desired: Mapping[str, IpSet], current: Mapping[str, KernelSet]) -> list[str]:
    return sorted(
        name
        for name, ips in desired.items()
        if name in current and (current[name].type, current[name].family) != (ips.type, ips.family)
    )


def referencing_chains(save_text: str, names: Iterable[str]) -> dict[str, list[str]]:
    """Our chains (all their ``-A`` lines as saved, in order) with a rule naming one of the sets ``names``."""
    pattern = re.compile(r"--match-set (?:" + "|".join(re.escape(n) for n in names) + r") ")
    by_chain: dict[str, list[str]] = {}
    for line in save_text.splitlines():
        if line.startswith(f"-A {OWNED_PREFIX}"):
            by_chain.setdefault(line.split(" ", 2)[1], []).append(line)
    return {chain: lines for chain, lines in by_chain.items() if any(pattern.search(line) for line in lines)}


def rewrite_chains(table: str, chains: Mapping[str, list[str]], rename: Mapping[str, str]) -> str:
    """Refill ``chains`` with their saved lines, set names replaced per ``rename``. Lines pointed at a temporary set
    also lose their hash (``podnet:t…`` is no hash), so that if we die before pointing them back, the next full
    sync sees those chains as drifted and rewrites them, and the temporary set can then go."""
    if not chains:
        return ""

    def sub(line: str) -> str:
        for old, new in rename.items():
            line = line.replace(f"--match-set {old} ", f"--match-set {new} ")
        if rename:
            line = line.replace(f'--comment "{HASH_TAG}', f'--comment "{HASH_TAG}t')
        return line

    lines = [f"*{table}", *(f":{c} - [0:0]" for c in chains)]
    lines += [sub(line) for saved in chains.values() for line in saved]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def retype_ipset_texts(desired: Mapping[str, IpSet], names: Iterable[str]) -> tuple[str, str, str]:
    """``ipset restore`` input for: the temporary sets filled; the sets recreated with their new type; the
    temporary sets destroyed."""
    fill, recreate, drop = [], [], []
    for name in names:
        ips = desired[name]
        tmp = temp_name(name)
        members = sorted({normalize_member(ips.type, m) for m in ips.members})
        n = len(members)
        create = f"{ips.type} family {ips.family} hashsize {hashsize_for(n)} maxelem {maxelem_for(n)}"
        fill += [f"create {tmp} {create}", f"flush {tmp}", *(f"add {tmp} {m}" for m in members)]
        recreate += [f"destroy {name}", f"create {name} {create}", *(f"add {name} {m}" for m in members)]
        drop.append(f"destroy {tmp}")
    return "\n".join(fill) + "\n", "\n".join(recreate) + "\n", "\n".join(drop) + "\n"
