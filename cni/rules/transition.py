"""Restore text that turns our part of a netns' tables into the wanted rules, leaving everything else.

Pure: `transition` (from a parsed iptables-save dump, for `iptables-restore --noflush`) and `fresh_text`
(for a netns that holds nothing of ours yet: `-N` makes it fail atomically otherwise).
"""

from __future__ import annotations

from cni.rules.saved import Owned, SavedTable, owned

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from cni.rules.builder import RuleSet


def desired_from_ruleset(rs: RuleSet) -> dict[str, Owned]:
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


def _not_accepting(table: SavedTable | None, want: Owned) -> list[str]:
    """Built-in chains our jumps go into whose policy is not ACCEPT (a DROP policy there would drop what
    our chains let through): set back to ACCEPT with our rules."""
    if table is None:
        return []
    chains = sorted({chain for chain, _, _ in want.jumps})
    return [c for c in chains if table.chains.get(c, "ACCEPT") not in ("ACCEPT", "-")]


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
        policies = _not_accepting(current.get(name), want)
        if (have.empty() and want.empty()) or (skip_unchanged and _same(have, want) and not policies):
            continue  # nothing to do: no restore, nothing rewritten
        out.append(f"*{name}")
        out.extend(f":{c} ACCEPT [0:0]" for c in policies)  # a built-in chain's policy (counters reset)
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
    return fresh_text(desired_from_ruleset(rs))
