"""Bring the kernel's podnet chains, jumps and ipsets to a desired ``DataplaneState``.

Order within one sync: ipset creates/adds/deletes first (a rule may only name an existing set), then one
iptables-restore transaction per table, then destroys of stale sets (only once no rule references them). The
writer remembers what it last wrote, so an incremental sync reads nothing but the built-in chains (to re-check that
our jump is still first); a full sync reads the kernel back and repairs whatever drifted. After any failure the
memory is dropped and the next sync is a full one.

The incremental re-check of the built-in chains is started in the background when the sync starts and collected
when its writes are done (it would otherwise be a third of a change's time): the writes are planned from the
built-in chains as last read, and a jump found moved or deleted is put back in a second transaction at once.

A table's transaction that the kernel refuses (a rule it will not take) is narrowed down: every chain it takes is
written, each refused chain is written as a placeholder that lets nothing through (``render.refused_placeholder``)
and reported in ``SyncResult.refused``; it stays so, without being retried, until its desired content changes.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

from agent.calc.state import Chain, DataplaneState, IpSet, KernelJump
from agent.dataplane.backend import Backend, detect
from agent.dataplane.cmd import CommandRunner
from agent.dataplane.ipset import Ipset
from agent.dataplane.iptables import Iptables, Listing, RestoreError
from agent.dataplane.render import (
    BUILTIN_CHAINS,
    KernelSet,
    TablePlan,
    after_jump_fixes,
    chain_lines,
    chain_of_line,
    check_names,
    is_our_jump,
    maxelem_for,
    needs_retype,
    normalize_member,
    parse_save,
    plan_ipsets,
    plan_table,
    referencing_chains,
    refused_placeholder,
    retype_ipset_texts,
    rewrite_chains,
    rule_hashes,
    rule_target,
    temp_name,
    transaction,
    with_jumps_reasserted,
)

log = logging.getLogger(__name__)


@dataclass
class SyncResult:
    full: bool
    chains_written: list[str] = field(default_factory=list)
    chains_deleted: list[str] = field(default_factory=list)
    jumps_fixed: list[str] = field(default_factory=list)
    sets_changed: int = 0
    sets_rebuilt: list[str] = field(default_factory=list)
    sets_destroyed: int = 0
    stale_found: int = 0  # stale chains, jumps and sets seen and left for a cleanup pass
    # "table/chain" -> the kernel's reason: chains held as placeholders because the kernel refused their content
    # (this sync's refusals and earlier ones whose desired content has not changed since)
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def wrote(self) -> bool:
        return bool(
            self.chains_written or self.chains_deleted or self.jumps_fixed or self.sets_changed or self.sets_destroyed
        )


@dataclass(frozen=True)
class Owned:
    """What podnet holds in the kernel, as the writer last left it (for the metrics)."""

    chains: dict[str, int]  # table -> podnet chains
    rules: dict[str, int]  # table -> rules in them
    ipsets: int
    members: int  # in all of those sets


class PolicyDataplane:
    """The only writer of podnet's iptables chains, kernel jumps and ipsets (in one network namespace)."""

    def __init__(self, runner: CommandRunner | None = None, backend: Backend | None = None) -> None:
        self.runner = runner or CommandRunner()
        self.backend = backend or detect(self.runner)
        self.iptables = Iptables(self.runner, self.backend)
        self.ipset = Ipset(self.runner)
        # What we believe the kernel holds; None = unknown, read it back on the next sync.
        self._chains: dict[str, dict[str, tuple[str, ...]]] | None = None
        self._jumps: set[tuple[str, str]] = set()  # (table, built-in chain) holding a podnet jump
        self._builtin: dict[str, dict[str, list[str]]] = {}  # table -> built-in chain -> rules, as last read
        self._sets: dict[str, KernelSet] | None = None
        self._written_sets: dict[str, IpSet] = {}  # the desired sets as last written, to skip unchanged ones
        # (table, chain) -> (hashes of the desired content the kernel refused, its reason). Not kernel state, so it
        # survives forget(): the content is not retried until it changes (or the process restarts).
        self._refused: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {}

    def owned(self) -> Owned | None:
        """Counts of what the last sync left in the kernel; None before the first one (or after a failure). Safe
        from any thread: the maps it reads are replaced by each sync, never changed once published."""
        chains, sets = self._chains, self._sets
        if chains is None or sets is None:
            return None
        return Owned(
            chains={t: len(c) for t, c in chains.items()},
            rules={t: sum(map(len, c.values())) for t, c in chains.items()},
            ipsets=len(sets),
            members=sum(len(s.members) for s in sets.values()),
        )

    def forget(self) -> None:
        self._chains = None
        self._sets = None
        self._written_sets = {}
        self._builtin = {}

    def apply(self, desired: DataplaneState, full: bool = False, delete_stale: bool = False) -> SyncResult:
        check_names(desired.tables, desired.ipsets)
        full = full or self._chains is None or self._sets is None
        result = SyncResult(full=full)
        try:
            self._apply(desired, full, delete_stale, result)
        except Exception as exc:
            self.forget()
            if full:
                raise
            # The kernel is not what we believed (say a jump deleted by hand, found by the legacy re-assert): read
            # it all back and repair now rather than on the next retry.
            log.warning("incremental sync failed, doing a full one: %s", exc)
            return self.apply(desired, full=True, delete_stale=delete_stale)
        result.refused = {f"{t}/{c}": reason for (t, c), (_, reason) in sorted(self._refused.items())}
        return result

    def _substitute_refused(self, desired: DataplaneState) -> DataplaneState:
        """``desired`` with each chain whose content the kernel refused before replaced by its placeholder; a
        refusal whose chain is gone or changed is forgotten (the new content gets its try)."""
        swapped: dict[str, dict[str, Chain]] = {}
        for (table, name), (hashes, _) in list(self._refused.items()):
            chain = desired.tables.get(table, {}).get(name)
            if chain is None or rule_hashes(chain) != hashes:
                del self._refused[(table, name)]
                continue
            swapped.setdefault(table, dict(desired.tables[table]))[name] = self._placeholder(table, name, desired.jumps)
        return replace(desired, tables={**desired.tables, **swapped}) if swapped else desired

    @staticmethod
    def _placeholder(table: str, name: str, jumps: Iterable[KernelJump]) -> Chain:
        # A chain a built-in chain jumps to sees all of the node's traffic: a DROP there would cut the node off, so
        # it is left empty (returns) instead; the chains below it are what isolate pods.
        if any(j.table == table and rule_target(j.rule) == name for j in jumps):
            return Chain(name, ())
        return refused_placeholder(name)

    def remove_all(self) -> SyncResult:
        """Delete every podnet jump, chain and ipset (uninstall); foreign rules stay as they are."""
        return self.apply(DataplaneState(), full=True, delete_stale=True)

    def _apply(self, wanted: DataplaneState, full: bool, delete_stale: bool, result: SyncResult) -> None:
        desired = self._substitute_refused(wanted)
        tables = sorted({"filter", *desired.tables, *(self._chains or {}), *(t for t, _ in self._jumps)})
        builtin: dict[str, dict[str, list[str]]] = {}
        recheck: dict[str, list[str]] = {}
        if full:
            chains: dict[str, dict[str, tuple[str, ...]]] = {}
            jumps: set[tuple[str, str]] = set()
            saved_sets = self.ipset.start_save()
            # Every table at once: a table holding podnet chains or jumps is ours to adopt or clean up even when
            # nothing is desired there any more (the nat table after natOutgoing was switched off).
            views = parse_save(self.iptables.save_all())
            held = {
                t
                for t, v in views.items()
                if t in BUILTIN_CHAINS
                and (v.chains or any(map(is_our_jump, (r for rs in v.builtin.values() for r in rs))))
            }
            tables = sorted({*tables, *held})
            for table in tables:
                view = views.get(table)
                chains[table] = dict(view.chains) if view else {}
                builtin[table] = dict(view.builtin) if view else {}
            sets = saved_sets()
        else:
            assert self._chains is not None and self._sets is not None
            chains = {t: dict(self._chains.get(t, {})) for t in tables}
            jumps = set(self._jumps)
            sets = dict(self._sets)
            for table in tables:
                names = {j.chain for j in desired.jumps if j.table == table} | {c for t, c in jumps if t == table}
                recheck[table] = sorted(names)
                builtin[table] = {c: list(self._builtin.get(table, {}).get(c, [])) for c in names}
        listing = self._write(
            desired,
            result,
            full=full,
            delete_stale=delete_stale,
            tables=tables,
            chains=chains,
            jumps=jumps,
            sets=sets,
            builtin=builtin,
            recheck=None if full else recheck,
        )
        # Chains refused during the writes are placeholders now: re-check the jumps against what was written.
        self._recheck_jumps(self._substitute_refused(wanted), delete_stale, result, listing.result())

    def _recheck_jumps(
        self, desired: DataplaneState, delete_stale: bool, result: SyncResult, fresh: dict[str, dict[str, list[str]]]
    ) -> None:
        """Compare the built-in chains as read during this sync with the plan; put back a jump someone moved or
        deleted (our chains are as wanted by now, so a plan here holds only jump fixes)."""
        assert self._chains is not None
        for table, listed in fresh.items():
            rules = {**self._builtin.get(table, {}), **listed}  # chains not re-read: as this sync left them
            plan = plan_table(
                table,
                desired=desired.tables.get(table, {}),
                jumps=desired.jumps,
                current_chains=self._chains.get(table, {}),
                builtin=rules,
                delete_stale=delete_stale,
            )
            if plan.text:
                log.info("podnet jump moved or deleted in %s %s: putting it back", table, ", ".join(plan.jumps_fixed))
                self.iptables.restore(table, plan.text)
                result.jumps_fixed += [f"{table}/{c}" for c in plan.jumps_fixed]
            self._builtin[table] = after_jump_fixes(rules, desired.jumps, table, plan.jumps_fixed)

    def _write(
        self,
        desired: DataplaneState,
        result: SyncResult,
        *,
        full: bool,
        delete_stale: bool,
        tables: list[str],
        chains: dict[str, dict[str, tuple[str, ...]]],
        jumps: set[tuple[str, str]],
        sets: dict[str, KernelSet],
        builtin: dict[str, dict[str, list[str]]],
        recheck: dict[str, list[str]] | None,
    ) -> Listing:
        """Write the sync; returns the re-read of the built-in chains ``recheck`` names (table -> chains), started
        in the background unless the table's transaction re-asserts its jumps itself (legacy, see below)."""
        retype = needs_retype(desired.ipsets, sets)
        if retype:
            self._retype(desired, retype, tables, sets)
            result.sets_rebuilt += retype
        unchanged = (
            frozenset() if full else frozenset(n for n, s in desired.ipsets.items() if self._written_sets.get(n) == s)
        )
        ipset_plan = plan_ipsets(desired.ipsets, sets, delete_stale, unchanged)
        result.stale_found += ipset_plan.stale_found
        plans = {
            table: plan_table(
                table,
                desired=desired.tables.get(table, {}),
                jumps=desired.jumps,
                current_chains=chains.get(table, {}),
                builtin=builtin.get(table, {}),
                delete_stale=delete_stale,
            )
            for table in tables
        }
        to_list: dict[str, list[str]] = {}
        for table, names in (recheck or {}).items():
            if self.backend.name == "legacy" and plans[table].text:
                # A legacy transaction replaces the whole table anyway, so deleting our jumps and inserting them first
                # again costs nothing, and re-reading the chains would only queue on the xtables lock before it. A
                # jump someone deleted makes the transaction fail; apply() then does a full sync.
                plans[table] = with_jumps_reasserted(plans[table], desired.jumps)
            else:
                # A chain whose jump this sync's transaction fixes is known once it commits; a listing running
                # beside it could read it before, and the jump would be fixed twice (or deleted twice).
                to_list[table] = [c for c in names if c not in plans[table].jumps_fixed]
        listing = self.iptables.start_listing(to_list)
        try:
            self.ipset.restore(ipset_plan.text)
            changed = sum(1 for name, s in ipset_plan.written.items() if sets.get(name) != s)
            result.sets_changed = changed
            result.sets_rebuilt += list(ipset_plan.rebuilt)
            sets = {**{n: s for n, s in sets.items() if not delete_stale}, **ipset_plan.written}

            for table in tables:
                plan = plans[table]
                refused: dict[str, Chain] = {}
                if plan.text:
                    try:
                        self.iptables.restore(table, plan.text)
                    except RestoreError as exc:
                        refused = self._narrow(table, plan, desired, chains.get(table, {}), exc)
                    log.debug("iptables %s: wrote %s, deleted %s", table, plan.chains_written, plan.chains_deleted)
                kept = {n: h for n, h in chains.get(table, {}).items() if not delete_stale}
                written = {**desired.tables.get(table, {}), **refused}
                chains[table] = {**kept, **{n: rule_hashes(c) for n, c in written.items()}}
                result.chains_written += [f"{table}/{c}" for c in plan.chains_written]
                result.chains_deleted += [f"{table}/{c}" for c in plan.chains_deleted]
                result.jumps_fixed += [f"{table}/{c}" for c in plan.jumps_fixed]
                result.stale_found += plan.stale_found
                jumps = {(t, c) for t, c in jumps if t != table}
                jumps |= {(j.table, j.chain) for j in desired.jumps if j.table == table}
                if not delete_stale:  # stale jumps stay until cleanup: remember where they are
                    jumps |= {(table, c) for c, rules in builtin.get(table, {}).items() if any(map(is_our_jump, rules))}
        except BaseException:
            listing.discard()
            raise
        fixed = {table: plan.jumps_fixed for table, plan in plans.items()}

        if ipset_plan.destroy_text:
            self.ipset.restore(ipset_plan.destroy_text)
            result.sets_destroyed = ipset_plan.destroy_text.count("\n")
        self._chains = chains
        self._jumps = jumps
        self._sets = sets
        self._written_sets = dict(desired.ipsets)
        self._builtin = {t: after_jump_fixes(b, desired.jumps, t, fixed.get(t, ())) for t, b in builtin.items()}
        return listing

    def _narrow(
        self,
        table: str,
        plan: TablePlan,
        desired: DataplaneState,
        existing: Collection[str],
        failure: RestoreError,
    ) -> dict[str, Chain]:
        """``plan``'s transaction was refused: write every chain of it the kernel takes, each refused one as its
        placeholder, then the plan's jump fixes and deletions. Returns the placeholders written.

        The refused line names its chain when the tool says which line failed (nft does for a rule the kernel
        refuses); otherwise (legacy reports the COMMIT) the chains are bisected. Chains not in the kernel yet are
        first created as placeholders, so that the rest can be written a group at a time in any order."""
        if not plan.chains_written or (chain_of_line(failure.line) is None and failure.line not in (None, "COMMIT")):
            raise failure  # a jump or deletion failed, not a chain: nothing to narrow
        chains = desired.tables.get(table, {})
        new = [name for name in plan.chains_written if name not in existing]
        holders = {name: self._placeholder(table, name, desired.jumps) for name in plan.chains_written}

        def fill(names: list[str], source: Mapping[str, Chain]) -> str:
            return transaction(table, names, [line for n in names for line in chain_lines(source[n])])

        if new:
            self.iptables.restore(table, fill(new, holders))
        refused: dict[str, str] = {}
        todo: list[tuple[list[str], RestoreError | None]] = [(list(plan.chains_written), failure)]
        while todo:
            group, error = todo.pop()
            if error is None:
                try:
                    self.iptables.restore(table, fill(group, chains))
                    continue
                except RestoreError as exc:
                    error = exc
            bad = chain_of_line(error.line)
            if len(group) == 1 or bad in group:
                name = group[0] if len(group) == 1 else str(bad)
                refused[name] = error.reason
                rest = [n for n in group if n != name]
                if rest:
                    todo.append((rest, None))
            else:
                half = len(group) // 2
                todo += [(group[:half], None), (group[half:], None)]
        before = [name for name in refused if name not in new]  # their old rules may allow what the new ones don't
        if before:
            self.iptables.restore(table, fill(before, holders))
        tail = [*plan.jump_lines, *(f"-X {name}" for name in plan.chains_deleted)]
        if tail:
            self.iptables.restore(table, transaction(table, plan.chains_deleted, tail))
        for name, reason in refused.items():
            self._refused[(table, name)] = (rule_hashes(chains[name]), reason)
            log.debug("iptables %s: chain %s refused: %s", table, name, reason)
        return {name: holders[name] for name in refused}

    def _retype(
        self,
        desired: DataplaneState,
        names: list[str],
        tables: list[str],
        sets: dict[str, KernelSet],
    ) -> None:
        """Change the type of sets in place (see render.py): rules are moved to a temporary set of the new type and
        back, each move one iptables transaction per table, using the rules' saved text: their content and hashes
        are the same afterwards, so what the caller remembers of the chains stays true."""
        log.info("ipsets changing type under the same name: %s", names)
        fill, recreate, drop = retype_ipset_texts(desired.ipsets, names)
        self.ipset.restore(fill)
        referencing = {t: referencing_chains(self.iptables.save(t), names) for t in tables}
        to_temp = {n: temp_name(n) for n in names}
        for table, found in referencing.items():
            if found:
                self.iptables.restore(table, rewrite_chains(table, found, to_temp))
        self.ipset.restore(recreate)
        for table, found in referencing.items():
            if found:
                self.iptables.restore(table, rewrite_chains(table, found, {}))
        self.ipset.restore(drop)
        for name in names:
            ips = desired.ipsets[name]
            members = frozenset(normalize_member(ips.type, m) for m in ips.members)
            sets[name] = KernelSet(name, ips.type, ips.family, maxelem_for(len(members)), members)
