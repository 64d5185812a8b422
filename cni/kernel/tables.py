"""Apply, check and remove headrace's iptables rules inside a network namespace, atomically.

How: `nsenter --net=PATH <iptables-FLAVOUR-save|restore>` (argv lists, no shell, started with
`posix_spawn`: see spawn.py). Writers hold a flock on
the netns file. Per address family the current state is read with save, then ONE
`iptables-restore --noflush` replaces everything of ours in one transaction: our old jump rules are
deleted (`-D`), our chains are declared (which creates or flushes them) and refilled, stale chains of ours
are flushed and deleted, and our jumps are inserted at the top of the built-in chains. Applying twice
therefore leaves exactly one set. The families' restores run in parallel; if one fails (after one retry
from a fresh save), the families that went in are put back to their saved state (rollback). Removal
deletes exactly our jumps and chains, so the netns is left as it was before (tables that did not exist
before stay as empty tables: a legacy table cannot be unloaded once created).

Stdlib only: imported by the CNI plugin, so nothing here imports `subprocess`, `dataclasses`, `typing`,
`contextlib` or `shlex` at run time (each costs the plugin milliseconds of start-up).
"""

from __future__ import annotations

import fcntl
import os
import time

from cni.kernel import spawn
from cni.kernel.flavour import binary
from cni.rules import builder

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from types import TracebackType
    from typing import Any, Protocol

    from cni.contract.kinds import Family
    from cni.contract.sidecar_params import SidecarParams
    from cni.contract.spec import AmbientSpec, SidecarSpec
    from cni.kernel.flavour import Flavour
    from cni.rules.builder import RuleSet, TableRules

    class _Log(Protocol):
        def log(self, level: str, step: str, msg: str, **extra: Any) -> None: ...


_TIMEOUT = 30.0
_WAIT = "--wait=10"  # xtables lock (legacy); accepted and ignored by nft
_LOCK_TIMEOUT = 60.0


class IptablesError(Exception):
    """An iptables step failed; `step` names it and `stderr` carries iptables' own words."""

    def __init__(self, step: str, message: str, stderr: str = "") -> None:
        self.step = step
        self.stderr = stderr.strip()
        text = f"{step}: {message}"
        if self.stderr:
            text += f": {self.stderr}"
        super().__init__(text)


# ---------------------------------------------------------------- running iptables in a netns


def _argv(netns_path: str | None, argv: Sequence[str]) -> list[str]:
    if netns_path is None:
        return list(argv)
    return ["nsenter", f"--net={netns_path}", "--", *argv]


def _run(step: str, netns_path: str | None, argv: Sequence[str], stdin: str | None = None) -> str:
    full = _argv(netns_path, argv)
    try:
        (proc,) = spawn.run_many([(full, stdin)], _TIMEOUT)
    except FileNotFoundError as exc:
        raise IptablesError(step, f"{full[0] if netns_path is None else 'nsenter'} not found", str(exc)) from exc
    except OSError as exc:
        raise IptablesError(step, f"{full[0]} could not be started", str(exc)) from exc
    if proc.returncode is None:
        raise IptablesError(step, f"{argv[0]} timed out after {_TIMEOUT:.0f}s")
    if proc.returncode != 0:
        raise IptablesError(step, f"{argv[0]} exited {proc.returncode}", proc.stderr)
    return proc.stdout


def save(netns_path: str | None, flavour: Flavour, family: Family) -> str:
    """The full iptables-save dump of one family (only existing tables; nothing gets created)."""
    return _run(f"save-v{family}", netns_path, [binary(flavour, family, "save")])


def save_families(netns_path: str | None, flavour: Flavour, families: Sequence[Family]) -> dict[Family, str]:
    """iptables-save of several families, run in parallel (the plugin's ADD latency matters)."""
    if len(families) < 2:
        return {f: save(netns_path, flavour, f) for f in families}
    argvs = [_argv(netns_path, [binary(flavour, f, "save")]) for f in families]
    try:
        results = spawn.run_many([(argv, None) for argv in argvs], _TIMEOUT)
    except OSError as exc:
        raise IptablesError(f"save-v{families[0]}", f"{argvs[0][0]} could not be started", str(exc)) from exc
    out: dict[Family, str] = {}
    for f, proc in zip(families, results, strict=True):
        if proc.returncode is None:
            raise IptablesError(f"save-v{f}", f"save timed out after {_TIMEOUT:.0f}s")
        if proc.returncode != 0:
            raise IptablesError(f"save-v{f}", f"{binary(flavour, f, 'save')} exited {proc.returncode}", proc.stderr)
        out[f] = proc.stdout
    return out


def _restore_argv(flavour: Flavour, family: Family) -> list[str]:
    return [binary(flavour, family, "restore"), "--noflush", _WAIT]


def _restore(netns_path: str | None, flavour: Flavour, family: Family, text: str, step: str) -> None:
    _run(step, netns_path, _restore_argv(flavour, family), stdin=text)


def _restore_many(
    netns_path: str | None, flavour: Flavour, texts: dict[Family, str], step: str
) -> dict[Family, IptablesError | None]:
    """One restore per family, all running at once; each is its own transaction. Result per family."""
    results: dict[Family, IptablesError | None] = {}
    fams = list(texts)
    argvs = [_argv(netns_path, _restore_argv(flavour, fam)) for fam in fams]
    try:
        procs = spawn.run_many([(argv, texts[fam]) for fam, argv in zip(fams, argvs, strict=True)], _TIMEOUT)
    except OSError as exc:
        return {fam: IptablesError(f"{step}-v{fam}", f"{argvs[0][0]} could not be started", str(exc)) for fam in fams}
    for fam, proc in zip(fams, procs, strict=True):
        results[fam] = _restore_result(flavour, fam, proc, step)
    return results


# ---------------------------------------------------------------- parsing iptables-save


class _Plain:
    """Equality and repr over ``__slots__`` (what @dataclass gave; `dataclasses` costs the plugin ms)."""

    __slots__: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  # mutable, like a non-frozen dataclass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self.__slots__)})"


class SavedTable(_Plain):
    __slots__ = ("name", "chains", "rules")  # noqa: RUF023 - field order (repr)

    def __init__(
        self, name: str, chains: dict[str, str] | None = None, rules: list[tuple[str, str]] | None = None
    ) -> None:
        self.name = name
        self.chains: dict[str, str] = {} if chains is None else chains  # chain -> policy ("-" for user chains)
        self.rules: list[tuple[str, str]] = [] if rules is None else rules  # (chain, "-A chain ...") in order

    def chain_rules(self, chain: str) -> list[str]:
        return [line for c, line in self.rules if c == chain]


def parse_save(text: str) -> dict[str, SavedTable]:
    """Tables of an iptables-save dump, keyed by name (comments and counters ignored)."""
    tables: dict[str, SavedTable] = {}
    current: SavedTable | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), SavedTable(line[1:].strip()))
        elif line == "COMMIT":
            current = None
        elif current is None:
            continue
        elif line.startswith(":"):
            name, _, rest = line[1:].partition(" ")
            current.chains[name] = rest.split(" ", 1)[0] if rest else "-"
        elif line.startswith("-A "):
            chain = line.split(" ", 2)[1]
            current.rules.append((chain, line))
    return tables


_PLAIN_CHARS = frozenset(chr(c) for c in range(0x20, 0x7F)) - frozenset("\"'\\") | {"\t"}


def rule_target(line: str) -> str | None:
    """The -j/-g target of a saved rule line."""
    if _PLAIN_CHARS.issuperset(line):
        tokens = line.split()  # no quotes, escapes or odd whitespace: what shlex.split would give
    else:
        import shlex  # quoted arguments (e.g. comments): rare, and shlex costs an import of re

        try:
            tokens = shlex.split(line)
        except ValueError:
            tokens = line.split()
    for i, tok in enumerate(tokens[:-1]):
        if tok in ("-j", "--jump", "-g", "--goto"):
            return tokens[i + 1]
    return None


class Owned(_Plain):
    """What of ours one table holds: chains (+ their rules) and jumps into them from other chains."""

    __slots__ = ("chains", "rules", "jumps")  # noqa: RUF023 - field order (repr)

    def __init__(
        self,
        chains: list[str] | None = None,
        rules: list[str] | None = None,
        jumps: list[tuple[str, int, str]] | None = None,
    ) -> None:
        self.chains: list[str] = [] if chains is None else chains
        self.rules: list[str] = [] if rules is None else rules
        self.jumps: list[tuple[str, int, str]] = [] if jumps is None else jumps  # (chain, 1-based position, line)

    def empty(self) -> bool:
        return not self.chains and not self.jumps


def owned(table: SavedTable, prefix: str) -> Owned:
    mine = [c for c in table.chains if c.startswith(prefix)]
    result = Owned(chains=mine)
    position: dict[str, int] = {}
    for chain, line in table.rules:
        position[chain] = position.get(chain, 0) + 1
        if chain in mine:
            result.rules.append(line)
            continue
        target = rule_target(line)
        if target is not None and target.startswith(prefix):
            result.jumps.append((chain, position[chain], line))
    return result


def _owned_all(tables: dict[str, SavedTable], prefix: str) -> dict[str, Owned]:
    found = {name: owned(t, prefix) for name, t in tables.items()}
    return {name: o for name, o in found.items() if not o.empty()}


def _desired_from_ruleset(rs: RuleSet) -> dict[str, Owned]:
    out: dict[str, Owned] = {}
    for t in rs.tables:
        counter: dict[str, int] = {}
        jumps: list[tuple[str, int, str]] = []
        for line in t.jumps:
            chain = line.split(" ", 2)[1]
            counter[chain] = counter.get(chain, 0) + 1
            jumps.append((chain, counter[chain], line))
        out[t.table] = Owned(chains=list(t.chains), rules=list(t.rules), jumps=jumps)
    return out


def _chain_rules(rules: list[str], chain: str) -> list[str]:
    return [r for r in rules if r.split(" ", 2)[1] == chain]


def _same(have: Owned, want: Owned) -> bool:
    """Our part of a table is already exactly `want`: the same chains with the same rules, and the same
    jumps at the same positions (ours at the top). Builder text is iptables-save canonical, so the
    strings compare (as CHECK does); anything else takes the restore path."""
    if set(have.chains) != set(want.chains) or sorted(have.jumps) != sorted(want.jumps):
        return False
    return all(_chain_rules(have.rules, c) == _chain_rules(want.rules, c) for c in want.chains)


def transition(
    current: dict[str, SavedTable], desired: dict[str, Owned], prefix: str, *, skip_unchanged: bool = False
) -> str:
    """Restore text (for --noflush) that turns our part of `current` into `desired`; other rules stay.

    Empty string when nothing has to change table-wise (no tables of ours now and none wanted; with
    `skip_unchanged`, also when ours are already exactly what is wanted: an ADD of the same rules then
    runs no restore at all).
    """
    out: list[str] = []
    for name in sorted(set(current) | set(desired)):
        have = owned(current[name], prefix) if name in current else Owned()
        want = desired.get(name, Owned())
        if (have.empty() and want.empty()) or (skip_unchanged and _same(have, want)):
            continue  # nothing to do: no restore, nothing rewritten
        out.append(f"*{name}")
        out.extend(f":{c} - [0:0]" for c in want.chains)  # creates, or flushes when present
        out.extend("-D" + line[2:] for _, _, line in have.jumps)
        stale = [c for c in have.chains if c not in want.chains]
        out.extend(f"-F {c}" for c in stale)
        out.extend(f"-X {c}" for c in stale)
        # Insert jumps by ascending position; clamp to the chain's length after our deletions.
        table = current.get(name)
        length: dict[str, int] = {}
        if table is not None:
            for chain, _line in table.rules:
                if chain not in have.chains:
                    length[chain] = length.get(chain, 0) + 1
            for chain, _, _ in have.jumps:
                length[chain] -= 1
        for chain, pos, line in sorted(want.jumps, key=lambda j: j[1]):
            n = length.get(chain, 0)
            out.append(f"-I {chain} {min(pos, n + 1)}" + line[len(f"-A {chain}") :])
            length[chain] = n + 1
        out.extend(want.rules)
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


# ---------------------------------------------------------------- generic apply / check / remove


def _families(families: Iterable[object]) -> tuple[Family, ...]:
    out: list[Family] = []
    for f in families:
        if f == 4 and 4 not in out:
            out.append(4)
        elif f == 6 and 6 not in out:
            out.append(6)
        elif f not in (4, 6):
            raise ValueError(f"address family must be 4 or 6, not {f!r}")
    if not out:
        raise ValueError("at least one address family is required")
    return tuple(out)


def _require_netns(netns_path: str | None, step: str) -> None:
    if netns_path is not None and not os.path.exists(netns_path):
        raise IptablesError(step, f"network namespace {netns_path} does not exist")


class netns_lock:
    """Serialise our writers (plugin, agent, threads) per netns: flock on the netns file itself, so two
    read-modify-write cycles cannot interleave (both would insert their jumps). None: this thread's."""

    __slots__ = ("fd", "path", "step")

    def __init__(self, netns_path: str | None, step: str) -> None:
        self.path = netns_path if netns_path is not None else "/proc/thread-self/ns/net"
        self.step = step
        self.fd = -1

    def __enter__(self) -> None:
        path, step = self.path, self.step
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise IptablesError(step, f"network namespace {path} does not exist") from None
        except OSError as exc:
            raise IptablesError(step, f"cannot open network namespace {path}", str(exc)) from exc
        try:
            deadline = time.monotonic() + _LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise IptablesError(step, f"timed out waiting for the lock on {path}") from None
                    time.sleep(0.005)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _emit(log: _Log | None, level: str, step: str, msg: str, **extra: Any) -> None:
    if log is not None:
        log.log(level, step, msg, **extra)


def _set_owned(
    netns_path: str | None,
    flavour: Flavour,
    family: Family,
    desired: dict[str, Owned],
    prefix: str,
    step: str,
    saved: str | None = None,
    attempts: int = 2,
) -> None:
    """Make our part of one family equal `desired` in one restore; on failure retry after a fresh save
    (the rules may have changed between save and restore). `saved`: a dump just taken (first attempt)."""
    for attempt in range(1, attempts + 1):
        text_now = saved if attempt == 1 and saved is not None else save(netns_path, flavour, family)
        text = transition(parse_save(text_now), desired, prefix)
        if not text:
            return
        try:
            _restore(netns_path, flavour, family, text, step)
            return
        except IptablesError:
            if attempt == attempts:
                raise


def fresh_text(desired: dict[str, Owned]) -> str:
    """Restore text that installs `desired` into a netns holding nothing of ours, and FAILS (atomically,
    changing nothing) if any of our chains already exists: `-N` refuses an existing chain on both flavours.
    Without our chains there can be no jumps of ours either (iptables keeps no jump to a missing chain),
    so inserting our jumps at positions 1..k of their chains is exactly what `transition` would do."""
    out: list[str] = []
    for name in sorted(desired):
        want = desired[name]
        if want.empty():
            continue
        out.append(f"*{name}")
        out.extend(f"-N {c}" for c in want.chains)
        for chain, pos, line in sorted(want.jumps, key=lambda j: j[1]):
            out.append(f"-I {chain} {pos}" + line[len(f"-A {chain}") :])
        out.extend(want.rules)
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def fresh_ruleset_text(rs: RuleSet) -> str:
    """The restore text an ADD into a new netns sends for this ruleset (`fresh_text` of its chains)."""
    return fresh_text(_desired_from_ruleset(rs))


def _apply(
    netns_path: str | None,
    rulesets: Sequence[RuleSet],
    flavour: Flavour,
    prefix: str,
    step: str,
    log: _Log | None,
    *,
    optimistic: bool = False,
    side_jobs: Sequence[SideJob] = (),
) -> dict[Family, dict[str, Owned]]:
    """Apply `rulesets` (the caller holds `netns_lock`); returns our part of each family before the apply
    (table → Owned; empty: nothing of ours was there).

    `optimistic`: first try `fresh_text` for every family at once (one restore each, no save: the
    common case of an ADD into a new netns); the families it refuses (our chains exist already) take the
    save → transition → restore path. `side_jobs`: commands run in the netns in parallel with the first
    stage; if one fails, whatever went in is rolled back (iptables, and what the other side jobs undo)
    and its error raised; if iptables fails, the side jobs' effects are undone too (`SideJob.undo`)."""
    families = [rs.family for rs in rulesets]
    desired = {rs.family: _desired_from_ruleset(rs) for rs in rulesets}
    before: dict[Family, dict[str, Owned]] = {}
    texts: dict[Family, str] = {}
    results: dict[Family, IptablesError | None] = {}
    side_error: IptablesError | None = None
    pending = list(families)
    ran: Sequence[SideJob] = side_jobs
    if optimistic:
        fresh = {fam: fresh_text(desired[fam]) for fam in families}
        todo = {f: t for f, t in fresh.items() if t}
        results, side_error = _restore_many_with(netns_path, flavour, todo, step, side_jobs)
        ran, side_jobs = side_jobs, ()  # they ran (or could not start: side_error says so)
        if side_error is not None and not results:
            pending = []  # the batch did not start: nothing changed
        else:
            pending = [fam for fam in families if results.get(fam) is not None]
            for fam in families:
                if fam not in pending:
                    before[fam], texts[fam] = {}, fresh[fam]  # nothing of ours was there: -N succeeded
            results = {fam: None for fam in families if fam not in pending}
        if pending and side_error is None:
            _emit(log, "debug", step, "our chains exist already: replacing them", families=pending)
    if pending and side_error is None:
        saved, side_error = _save_with(netns_path, flavour, pending, side_jobs)
        for fam in pending if side_error is None else ():
            before[fam] = _owned_all(parse_save(saved[fam]), prefix)
            texts[fam] = transition(parse_save(saved[fam]), desired[fam], prefix, skip_unchanged=True)
        if side_error is None:
            results.update(_restore_many(netns_path, flavour, {f: texts[f] for f in pending if texts[f]}, step))
            for fam in pending:
                if results.get(fam) is None:
                    continue
                # The rules may have changed between save and restore: one retry from a fresh save.
                err = results[fam]
                _emit(log, "warning", step, "iptables restore failed, retrying", family=fam, error=str(err))
                try:
                    _set_owned(netns_path, flavour, fam, desired[fam], prefix, f"{step}-v{fam}", attempts=1)
                    results[fam] = None
                except IptablesError as exc:
                    results[fam] = exc
    failed = [(fam, err) for fam, err in results.items() if err is not None]
    if failed or side_error is not None:
        for fam, err in failed:
            _emit(log, "error", step, "iptables restore failed, rolling back", family=fam, error=str(err))
        if side_error is not None:
            _emit(log, "error", step, "setting up the netns failed, rolling back", error=str(side_error))
        for fam in families:
            if texts.get(fam) and fam in results and results[fam] is None:
                try:
                    _set_owned(netns_path, flavour, fam, before[fam], prefix, f"rollback-v{fam}")
                except IptablesError as rb_exc:
                    _emit(log, "error", step, "rollback failed", family=fam, error=str(rb_exc))
        _undo_side_jobs(netns_path, ran, step, log)
        if side_error is not None:
            raise side_error
        raise failed[0][1]
    _emit(log, "info", step, "iptables rules applied", families=list(families), flavour=flavour)
    return before


def _restore_result(flavour: Flavour, fam: Family, proc: spawn.Result, step: str) -> IptablesError | None:
    if proc.returncode is None:
        return IptablesError(f"{step}-v{fam}", f"restore timed out after {_TIMEOUT:.0f}s")
    if proc.returncode != 0:
        what = binary(flavour, fam, "restore")
        return IptablesError(f"{step}-v{fam}", f"{what} exited {proc.returncode}", proc.stderr)
    return None


class SideJob:
    """A command run in the netns (argv without the nsenter wrapper; `stdin` fed to it) together with the
    first iptables stage of an apply. `done` once it succeeded; `undo` gives what takes its effect back
    when the apply is rolled back (None: nothing to undo, e.g. the ::6 address on lo)."""

    __slots__ = ("argv", "done", "stdin", "step")

    def __init__(self, step: str, argv: list[str], stdin: str | None = None) -> None:
        self.step = step
        self.argv = argv
        self.stdin = stdin
        self.done = False

    def error(self, proc: spawn.Result) -> IptablesError | None:
        if proc.returncode is None:
            return IptablesError(self.step, f"{self.argv[0]} timed out after {_TIMEOUT:.0f}s")
        why = self._failure(proc)
        if why is not None:
            return IptablesError(self.step, why, proc.stderr)
        self.done = True
        return None

    def _failure(self, proc: spawn.Result) -> str | None:
        return f"{self.argv[0]} exited {proc.returncode}" if proc.returncode != 0 else None

    def undo(self) -> tuple[list[str], str | None] | None:
        return None


class TproxyRoutesJob(SideJob):
    """One family's TPROXY policy routing (and, IPv6, the ::6 address): an `ip -force -batch` where a rule
    or route that exists already is success; a rollback deletes exactly what this run created."""

    __slots__ = ("added", "family", "lines")

    def __init__(self, family: Family) -> None:
        from cni.rules import tproxy_routes  # TPROXY pods only: REDIRECT ADDs do not load it

        self.family = family
        self.lines = tproxy_routes.add_lines(family)
        self.added: list[str] = []
        super().__init__(f"tproxy-routes-v{family}", tproxy_routes.argv(family), tproxy_routes.batch_text(self.lines))

    def _failure(self, proc: spawn.Result) -> str | None:
        from cni.rules import tproxy_routes

        why = tproxy_routes.add_error(self.lines, proc.stderr, proc.returncode or 0)
        if why is None:
            self.added = tproxy_routes.newly_added(self.lines, proc.stderr)
        return why

    def undo(self) -> tuple[list[str], str | None] | None:
        if not self.done or not self.added:
            return None
        from cni.rules import tproxy_routes

        return self.argv, tproxy_routes.batch_text(tproxy_routes.undo_lines(self.added))


def _undo_side_jobs(netns_path: str | None, jobs: Sequence[SideJob], step: str, log: _Log | None) -> None:
    undos = [u for u in (job.undo() for job in jobs) if u is not None]
    if not undos:
        return
    try:
        procs = spawn.run_many([(_argv(netns_path, argv), stdin) for argv, stdin in undos], _TIMEOUT)
    except OSError as exc:
        _emit(log, "error", step, "undoing the netns set-up failed", error=str(exc))
        return
    for (argv, _), proc in zip(undos, procs, strict=True):
        if proc.returncode != 0:
            _emit(log, "error", step, "undoing the netns set-up failed", argv=argv, error=proc.stderr.strip())


def _with_side_job(
    netns_path: str | None, jobs: Sequence[tuple[list[str], str | None]], side_jobs: Sequence[SideJob]
) -> tuple[list[spawn.Result], IptablesError | None]:
    """Run `jobs` (argv already netns-wrapped) and the side jobs together. A batch that cannot be started
    is reported as the first side job's error (the side job always ran first before batching: same
    outcome). The error is the first failed side job's."""
    if not side_jobs:
        return spawn.run_many(jobs, _TIMEOUT), None
    side = [(_argv(netns_path, sj.argv), sj.stdin) for sj in side_jobs]
    try:
        procs = spawn.run_many([*jobs, *side], _TIMEOUT)
    except FileNotFoundError as exc:
        missing = side[0][0][0] if netns_path is None else "nsenter"
        return [], IptablesError(side_jobs[0].step, f"{missing} not found", str(exc))
    except OSError as exc:
        return [], IptablesError(side_jobs[0].step, f"{side[0][0][0]} could not be started", str(exc))
    errors = [sj.error(proc) for sj, proc in zip(side_jobs, procs[len(jobs) :], strict=True)]
    return procs[: len(jobs)], next((e for e in errors if e is not None), None)


def _restore_many_with(
    netns_path: str | None,
    flavour: Flavour,
    texts: dict[Family, str],
    step: str,
    side_jobs: Sequence[SideJob],
) -> tuple[dict[Family, IptablesError | None], IptablesError | None]:
    """`_restore_many`, plus the side jobs in the same batch of processes."""
    if not side_jobs:
        return _restore_many(netns_path, flavour, texts, step), None
    fams = list(texts)
    jobs: list[tuple[list[str], str | None]] = [
        (_argv(netns_path, _restore_argv(flavour, fam)), texts[fam]) for fam in fams
    ]
    procs, side_error = _with_side_job(netns_path, jobs, side_jobs)
    if not procs:
        return {}, side_error
    return {fam: _restore_result(flavour, fam, proc, step) for fam, proc in zip(fams, procs, strict=True)}, side_error


def _save_with(
    netns_path: str | None, flavour: Flavour, families: Sequence[Family], side_jobs: Sequence[SideJob]
) -> tuple[dict[Family, str], IptablesError | None]:
    """`save_families`, plus the side jobs in the same batch of processes."""
    if not side_jobs:
        return save_families(netns_path, flavour, families), None
    jobs: list[tuple[list[str], str | None]] = [
        (_argv(netns_path, [binary(flavour, f, "save")]), None) for f in families
    ]
    procs, side_error = _with_side_job(netns_path, jobs, side_jobs)
    if not procs:
        return {}, side_error
    out: dict[Family, str] = {}
    for f, proc in zip(families, procs, strict=True):
        if proc.returncode is None:
            raise IptablesError(f"save-v{f}", f"save timed out after {_TIMEOUT:.0f}s")
        if proc.returncode != 0:
            raise IptablesError(f"save-v{f}", f"{binary(flavour, f, 'save')} exited {proc.returncode}", proc.stderr)
        out[f] = proc.stdout
    return out, side_error


def check_rulesets(netns_path: str | None, rulesets: Sequence[RuleSet], flavour: Flavour) -> list[str]:
    """Problems (missing, altered, duplicated or extra rules of ours); empty when intact."""
    if netns_path is not None and not os.path.exists(netns_path):
        return [f"network namespace {netns_path} does not exist"]
    try:
        saved = save_families(netns_path, flavour, [rs.family for rs in rulesets])
    except IptablesError as exc:
        return [f"cannot read rules: {exc}"]
    problems: list[str] = []
    for rs in rulesets:
        problems.extend(_compare(parse_save(saved[rs.family]), rs))
    return problems


def _compare(current: dict[str, SavedTable], rs: RuleSet) -> list[str]:
    problems: list[str] = []
    v = f"IPv{rs.family}"
    expected_tables = {t.table: t for t in rs.tables}
    for name in sorted(set(current) | set(expected_tables)):
        want: TableRules | None = expected_tables.get(name)
        table = current.get(name)
        have = owned(table, rs.owner_prefix) if table is not None else Owned()
        if want is None:
            for c in have.chains:
                problems.append(f"{v} {name}: unexpected chain {c}")
            for _, _, line in have.jumps:
                problems.append(f"{v} {name}: unexpected jump '{line}'")
            continue
        for chain in want.chains:
            if table is None or chain not in table.chains:
                problems.append(f"{v} {name}: chain {chain} is missing")
                continue
            got = table.chain_rules(chain)
            exp = [r for r in want.rules if r.split(" ", 2)[1] == chain]
            if got != exp:
                problems.append(_diff(f"{v} {name}: chain {chain}", exp, got))
        for c in have.chains:
            if c not in want.chains:
                problems.append(f"{v} {name}: unexpected chain {c}")
        found = [line for _, _, line in have.jumps]
        for line in want.jumps:
            n = found.count(line)
            if n == 0:
                problems.append(f"{v} {name}: jump '{line}' is missing")
            elif n > 1:
                problems.append(f"{v} {name}: jump '{line}' is present {n} times")
        for line in found:
            if line not in want.jumps:
                problems.append(f"{v} {name}: unexpected jump '{line}'")
    return problems


def _diff(what: str, expected: list[str], got: list[str]) -> str:
    for i, (e, g) in enumerate(zip(expected, got, strict=False)):
        if e != g:
            return f"{what} rule {i + 1} altered: expected '{e}', found '{g}'"
    if len(got) < len(expected):
        return f"{what} has {len(got)} rules, expected {len(expected)}; first missing: '{expected[len(got)]}'"
    return f"{what} has {len(got)} rules, expected {len(expected)}; first extra: '{got[len(expected)]}'"


# ---------------------------------------------------------------- public API


def apply_sidecar(
    netns_path: str,
    spec: SidecarSpec | SidecarParams,
    families: Iterable[Family],
    flavour: Flavour,
    *,
    log: _Log | None = None,
    optimistic: bool = False,
) -> None:
    """Install (or replace) the sidecar chains in the pod netns; all families or none.

    With IPv6, ::6/128 is also put on `lo` (as istio-iptables does) so the sidecar can bind its inbound
    passthrough source; the address is left in place on removal (harmless, dies with the pod netns). It
    is added in parallel with the first iptables step; if that fails, the rules are rolled back.
    TPROXY mode (`builder.uses_tproxy`): instead, one `ip -batch` per family adds the policy routing (and
    the ::6 address), in parallel with the first iptables step likewise; a failure on either side rolls
    both back (the routing entries this run created are deleted). Replacing TPROXY rules by REDIRECT ones
    deletes the policy routing.
    `optimistic` (the CNI ADD into a fresh netns): try the one-restore-per-family `fresh_text` first."""
    fams = _families(families)
    rulesets = [builder.sidecar_rules(spec, f) for f in fams]
    tproxy = builder.uses_tproxy(spec)
    jobs: list[SideJob]
    if tproxy:
        jobs = [TproxyRoutesJob(f) for f in fams]
    elif 6 in fams:
        jobs = [SideJob("lo-v6", ["ip", "-6", "addr", "replace", builder.PASSTHROUGH_SOURCE[6], "dev", "lo"])]
    else:
        jobs = []
    step = "apply-sidecar"
    _require_netns(netns_path, step)
    with netns_lock(netns_path, step):
        before = _apply(
            netns_path, rulesets, flavour, builder.SIDECAR_PREFIX, step, log, optimistic=optimistic, side_jobs=jobs
        )
        if not tproxy:
            was_tproxy = [fam for fam, owned_before in before.items() if "mangle" in owned_before]
            if was_tproxy:
                remove_tproxy_routes(netns_path, was_tproxy, log=log)


def remove_tproxy_routes(netns_path: str | None, families: Iterable[Family], *, log: _Log | None = None) -> None:
    """Delete our TPROXY policy routing (rule + local route) of these families; absent entries are fine."""
    from cni.rules import tproxy_routes

    fams = _families(families)
    batches = [(tproxy_routes.argv(f), tproxy_routes.del_lines(f)) for f in fams]
    try:
        procs = spawn.run_many(
            [(_argv(netns_path, argv), tproxy_routes.batch_text(lines)) for argv, lines in batches], _TIMEOUT
        )
    except OSError as exc:
        raise IptablesError("tproxy-routes-remove", "ip could not be started", str(exc)) from exc
    for fam, (_, lines), proc in zip(fams, batches, procs, strict=True):
        if proc.returncode is None:
            raise IptablesError(f"tproxy-routes-remove-v{fam}", f"ip timed out after {_TIMEOUT:.0f}s")
        why = tproxy_routes.del_error(lines, proc.stderr, proc.returncode)
        if why is not None:
            raise IptablesError(f"tproxy-routes-remove-v{fam}", why)
    _emit(log, "info", "tproxy-routes", "TPROXY policy routing removed", families=list(fams))


def check_tproxy_routes(netns_path: str | None, families: Iterable[Family]) -> list[str]:
    """Problems with our TPROXY policy routing (missing rule or route), per family."""
    from cni.rules import tproxy_routes

    fams = _families(families)
    text = tproxy_routes.batch_text(tproxy_routes.check_lines())
    try:
        procs = spawn.run_many([(_argv(netns_path, tproxy_routes.argv(f)), text) for f in fams], _TIMEOUT)
    except OSError as exc:
        return [f"cannot read the policy routing: ip could not be started: {exc}"]
    problems: list[str] = []
    for fam, proc in zip(fams, procs, strict=True):
        if proc.returncode is None:
            problems.append(f"IPv{fam} policy routing: ip timed out")
            continue
        problems.extend(tproxy_routes.check_problems(fam, proc.stdout))
    return problems


def check_sidecar(
    netns_path: str, spec: SidecarSpec | SidecarParams, families: Iterable[Family], flavour: Flavour
) -> list[str]:
    """Problems with the sidecar rules (and, in TPROXY mode, the policy routing); empty when intact."""
    fams = _families(families)
    rulesets = [builder.sidecar_rules(spec, f) for f in fams]
    problems = check_rulesets(netns_path, rulesets, flavour)
    if builder.uses_tproxy(spec) and not (netns_path is not None and not os.path.exists(netns_path)):
        problems.extend(check_tproxy_routes(netns_path, fams))
    return problems


def apply_ambient(
    netns_path: str,
    spec: AmbientSpec,
    families: Iterable[Family],
    flavour: Flavour,
    *,
    log: _Log | None = None,
) -> None:
    """Install (or replace) the ambient in-pod chains in the pod netns; all families or none."""
    rulesets = [builder.ambient_rules(spec, f) for f in _families(families)]
    _require_netns(netns_path, "apply-ambient")
    with netns_lock(netns_path, "apply-ambient"):
        _apply(netns_path, rulesets, flavour, builder.AMBIENT_PREFIX, "apply-ambient", log)


def check_ambient(netns_path: str, spec: AmbientSpec, families: Iterable[Family], flavour: Flavour) -> list[str]:
    rulesets = [builder.ambient_rules(spec, f) for f in _families(families)]
    return check_rulesets(netns_path, rulesets, flavour)


def remove_all(netns_path: str | None, flavour: Flavour, *, log: _Log | None = None) -> None:
    """Delete every HEADRACE_* chain and every jump into one, both families. Idempotent; a netns that
    does not exist (any more) is success."""
    if netns_path is not None and not os.path.exists(netns_path):
        _emit(log, "info", "remove", "netns already gone", netns=netns_path)
        return
    try:
        with netns_lock(netns_path, "remove"):
            saved = save_families(netns_path, flavour, (4, 6))
            parsed = {f: parse_save(saved[f]) for f in (4, 6)}
            texts: dict[Family, str] = {f: transition(parsed[f], {}, builder.OWNED_PREFIX) for f in (4, 6)}
            # TPROXY-mode sidecar chains (mangle) come with policy routing: removed along with them
            both: tuple[Family, ...] = (4, 6)
            tproxy_fams = [
                f for f in both if "mangle" in parsed[f] and owned(parsed[f]["mangle"], builder.SIDECAR_PREFIX).chains
            ]
            # both families' restores at once; a failed one is retried once from a fresh save
            results = _restore_many(netns_path, flavour, {f: t for f, t in texts.items() if t}, "remove")
            for family, err in results.items():
                if err is not None:
                    step = f"remove-v{family}"
                    _set_owned(netns_path, flavour, family, {}, builder.OWNED_PREFIX, step, attempts=1)
            if tproxy_fams:
                remove_tproxy_routes(netns_path, tproxy_fams, log=log)
    except IptablesError:
        if netns_path is not None and not os.path.exists(netns_path):
            return
        raise
    _emit(log, "info", "remove", "iptables rules removed", flavour=flavour)


def installed(netns_path: str | None, flavour: Flavour) -> bool:
    """Whether any HEADRACE_* chain or jump exists in the netns (either family)."""
    if netns_path is not None and not os.path.exists(netns_path):
        return False
    saved = save_families(netns_path, flavour, (4, 6))
    return any(_owned_all(parse_save(text), builder.OWNED_PREFIX) for text in saved.values())


def sync_node_probe_rules(
    netns_path: str | None,
    pod_ips: Iterable[object],
    flavour: Flavour,
    *,
    log: _Log | None = None,
) -> None:
    """Make HEADRACE_POSTROUTING (nat) in the node's netns SNAT host-originated TCP to exactly these pod
    IPs to the probe address; one atomic restore per family. A family without pod IPs gets no chain."""
    _require_netns(netns_path, "node-probe")
    ips = builder.parse_pod_ips(pod_ips)
    with netns_lock(netns_path, "node-probe"):
        for family in (4, 6):
            fam_ips = [ip for ip in ips if ip.version == family]
            desired = _desired_from_ruleset(builder.node_probe_rules(fam_ips, family)) if fam_ips else {}
            _set_owned(netns_path, flavour, family, desired, builder.NODE_CHAIN, f"node-probe-v{family}")
    _emit(log, "info", "node-probe", "node probe SNAT rules synced", pod_ips=[str(i) for i in ips])


def check_node_probe_rules(netns_path: str | None, pod_ips: Iterable[object], flavour: Flavour) -> list[str]:
    ips = builder.parse_pod_ips(pod_ips)
    problems: list[str] = []
    for family in (4, 6):
        fam_ips = [ip for ip in ips if ip.version == family]
        rs = builder.node_probe_rules(fam_ips, family)
        if fam_ips:
            problems.extend(check_rulesets(netns_path, [rs], flavour))
        else:
            current = parse_save(save(netns_path, flavour, family))
            for name in _owned_all(current, builder.NODE_CHAIN):
                problems.append(f"IPv{family} {name}: unexpected {builder.NODE_CHAIN} (no pod IPs of this family)")
    return problems
