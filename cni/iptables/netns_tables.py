"""Apply, check and remove headrace's iptables rules inside a network namespace, atomically.

How: `nsenter --net=PATH <iptables-FLAVOUR-save|restore>` (argv lists, no shell). Writers hold a flock on
the netns file. Per address family the current state is read with save, then ONE
`iptables-restore --noflush` replaces everything of ours in one transaction: our old jump rules are
deleted (`-D`), our chains are declared (which creates or flushes them) and refilled, stale chains of ours
are flushed and deleted, and our jumps are inserted at the top of the built-in chains. Applying twice
therefore leaves exactly one set. The families' restores run in parallel; if one fails (after one retry
from a fresh save), the families that went in are put back to their saved state (rollback). Removal
deletes exactly our jumps and chains, so the netns is left as it was before (tables that did not exist
before stay as empty tables: a legacy table cannot be unloaded once created).

Stdlib only: imported by the CNI plugin.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cni.iptables import builder
from cni.iptables.builder import RuleSet, TableRules
from cni.iptables.flavour import Flavour, binary
from cni.redirect_spec import AmbientSpec, Family, SidecarSpec

_TIMEOUT = 30.0
_WAIT = "--wait=10"  # xtables lock (legacy); accepted and ignored by nft
_LOCK_TIMEOUT = 60.0


class _Log(Protocol):
    def log(self, level: str, step: str, msg: str, **extra: Any) -> None: ...


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
        proc = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=_TIMEOUT, check=False)
    except FileNotFoundError as exc:
        raise IptablesError(step, f"{full[0] if netns_path is None else 'nsenter'} not found", str(exc)) from exc
    except subprocess.TimeoutExpired as exc:
        raise IptablesError(step, f"{argv[0]} timed out after {_TIMEOUT:.0f}s") from exc
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
    procs: dict[Family, subprocess.Popen[str]] = {}
    try:
        for f in families:
            argv = _argv(netns_path, [binary(flavour, f, "save")])
            try:
                procs[f] = subprocess.Popen(
                    argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
                )
            except OSError as exc:
                raise IptablesError(f"save-v{f}", f"{argv[0]} could not be started", str(exc)) from exc
        out: dict[Family, str] = {}
        for f, proc in procs.items():
            try:
                stdout, stderr = proc.communicate(timeout=_TIMEOUT)
            except subprocess.TimeoutExpired as exc:
                raise IptablesError(f"save-v{f}", f"save timed out after {_TIMEOUT:.0f}s") from exc
            if proc.returncode != 0:
                raise IptablesError(f"save-v{f}", f"{binary(flavour, f, 'save')} exited {proc.returncode}", stderr)
            out[f] = stdout
        return out
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _restore_argv(flavour: Flavour, family: Family) -> list[str]:
    return [binary(flavour, family, "restore"), "--noflush", _WAIT]


def _restore(netns_path: str | None, flavour: Flavour, family: Family, text: str, step: str) -> None:
    _run(step, netns_path, _restore_argv(flavour, family), stdin=text)


def _restore_many(
    netns_path: str | None, flavour: Flavour, texts: dict[Family, str], step: str
) -> dict[Family, IptablesError | None]:
    """One restore per family, all running at once; each is its own transaction. Result per family."""
    results: dict[Family, IptablesError | None] = {}
    procs: dict[Family, subprocess.Popen[str]] = {}
    try:
        for fam, text in texts.items():
            argv = _argv(netns_path, _restore_argv(flavour, fam))
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            except OSError as exc:
                results[fam] = IptablesError(f"{step}-v{fam}", f"{argv[0]} could not be started", str(exc))
                continue
            procs[fam] = proc
            stdin, proc.stdin = proc.stdin, None  # written here, so communicate() only collects output
            assert stdin is not None
            try:
                stdin.write(text)
                stdin.close()
            except BrokenPipeError:
                pass  # the process died early; its exit status and stderr tell why
        for fam, proc in procs.items():
            try:
                _, stderr = proc.communicate(timeout=_TIMEOUT)
            except subprocess.TimeoutExpired:
                results[fam] = IptablesError(f"{step}-v{fam}", f"restore timed out after {_TIMEOUT:.0f}s")
                continue
            if proc.returncode == 0:
                results[fam] = None
            else:
                what = binary(flavour, fam, "restore")
                results[fam] = IptablesError(f"{step}-v{fam}", f"{what} exited {proc.returncode}", stderr)
        return results
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------- parsing iptables-save


@dataclass
class SavedTable:
    name: str
    chains: dict[str, str] = field(default_factory=dict)  # chain -> policy ("-" for user chains)
    rules: list[tuple[str, str]] = field(default_factory=list)  # (chain, "-A chain ...") in order

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


def rule_target(line: str) -> str | None:
    """The -j/-g target of a saved rule line."""
    try:
        tokens = shlex.split(line)
    except ValueError:
        tokens = line.split()
    for i, tok in enumerate(tokens[:-1]):
        if tok in ("-j", "--jump", "-g", "--goto"):
            return tokens[i + 1]
    return None


@dataclass
class Owned:
    """What of ours one table holds: chains (+ their rules) and jumps into them from other chains."""

    chains: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    jumps: list[tuple[str, int, str]] = field(default_factory=list)  # (chain, 1-based position, line)

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


def transition(current: dict[str, SavedTable], desired: dict[str, Owned], prefix: str) -> str:
    """Restore text (for --noflush) that turns our part of `current` into `desired`; other rules stay.

    Empty string when nothing has to change table-wise (no tables of ours now and none wanted).
    """
    out: list[str] = []
    for name in sorted(set(current) | set(desired)):
        have = owned(current[name], prefix) if name in current else Owned()
        want = desired.get(name, Owned())
        if have.empty() and want.empty():
            continue
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


@contextlib.contextmanager
def netns_lock(netns_path: str | None, step: str) -> Iterator[None]:
    """Serialise our writers (plugin, agent, threads) per netns: flock on the netns file itself, so two
    read-modify-write cycles cannot interleave (both would insert their jumps). None: this thread's."""
    path = netns_path if netns_path is not None else "/proc/thread-self/ns/net"
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
        yield
    finally:
        os.close(fd)


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


def _apply(
    netns_path: str | None,
    rulesets: Sequence[RuleSet],
    flavour: Flavour,
    prefix: str,
    step: str,
    log: _Log | None,
) -> None:
    _require_netns(netns_path, step)
    with netns_lock(netns_path, step):
        _apply_locked(netns_path, rulesets, flavour, prefix, step, log)


def _apply_locked(
    netns_path: str | None,
    rulesets: Sequence[RuleSet],
    flavour: Flavour,
    prefix: str,
    step: str,
    log: _Log | None,
) -> None:
    families = [rs.family for rs in rulesets]
    saved = save_families(netns_path, flavour, families)
    before = {fam: _owned_all(parse_save(text), prefix) for fam, text in saved.items()}
    desired = {rs.family: _desired_from_ruleset(rs) for rs in rulesets}
    texts = {fam: transition(parse_save(saved[fam]), desired[fam], prefix) for fam in families}
    results = _restore_many(netns_path, flavour, {f: t for f, t in texts.items() if t}, step)
    for fam, err in list(results.items()):
        if err is None:
            continue
        # The rules may have changed between save and restore: one retry from a fresh save.
        _emit(log, "warning", step, "iptables restore failed, retrying", family=fam, error=str(err))
        try:
            _set_owned(netns_path, flavour, fam, desired[fam], prefix, f"{step}-v{fam}", attempts=1)
            results[fam] = None
        except IptablesError as exc:
            results[fam] = exc
    failed = [(fam, err) for fam, err in results.items() if err is not None]
    if failed:
        for fam, err in failed:
            _emit(log, "error", step, "iptables restore failed, rolling back", family=fam, error=str(err))
        for fam in families:
            if texts[fam] and results.get(fam) is None:
                try:
                    _set_owned(netns_path, flavour, fam, before[fam], prefix, f"rollback-v{fam}")
                except IptablesError as rb_exc:
                    _emit(log, "error", step, "rollback failed", family=fam, error=str(rb_exc))
        raise failed[0][1]
    _emit(log, "info", step, "iptables rules applied", families=list(families), flavour=flavour)


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
    spec: SidecarSpec,
    families: Iterable[Family],
    flavour: Flavour,
    *,
    log: _Log | None = None,
) -> None:
    """Install (or replace) the sidecar chains in the pod netns; all families or none.

    With IPv6, ::6/128 is also put on `lo` (as istio-iptables does) so the sidecar can bind its inbound
    passthrough source; the address is left in place on removal (harmless, dies with the pod netns)."""
    fams = _families(families)
    rulesets = [builder.sidecar_rules(spec, f) for f in fams]
    if 6 in fams:
        _require_netns(netns_path, "apply-sidecar")
        _run("lo-v6", netns_path, ["ip", "-6", "addr", "replace", builder.PASSTHROUGH_SOURCE[6], "dev", "lo"])
    _apply(netns_path, rulesets, flavour, builder.SIDECAR_PREFIX, "apply-sidecar", log)


def check_sidecar(netns_path: str, spec: SidecarSpec, families: Iterable[Family], flavour: Flavour) -> list[str]:
    rulesets = [builder.sidecar_rules(spec, f) for f in _families(families)]
    return check_rulesets(netns_path, rulesets, flavour)


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
            for family in (4, 6):
                step = f"remove-v{family}"
                _set_owned(netns_path, flavour, family, {}, builder.OWNED_PREFIX, step, saved[family])
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
