"""CHECK: how our rules in a parsed iptables-save dump differ from a wanted ruleset, in words.

Pure. Builder text is iptables-save canonical, so saved lines and wanted lines compare as strings.
Besides our chains and the count of our jumps, what decides whether traffic meets our redirection at all
is checked too: our jumps must be the first rules of the built-in chains they are in (a rule ahead of
them, e.g. `-I OUTPUT -j ACCEPT`, lets traffic skip the redirect), and those chains' policy must be
ACCEPT (`bypass_problems`).
"""

from __future__ import annotations

from cni.rules.rule_text import OWNED_PREFIX
from cni.rules.saved import Owned, SavedTable, owned, rule_target

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from cni.rules.builder import RuleSet, TableRules


def compare(current: dict[str, SavedTable], rs: RuleSet) -> list[str]:
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
        if table is not None:
            problems.extend(bypass_problems(table, want, v))
    return problems


def hooked_chains(want: TableRules) -> list[str]:
    """The built-in chains our jumps go into, in order of first appearance."""
    out: list[str] = []
    for line in want.jumps:
        chain = line.split(" ", 2)[1]
        if chain not in out:
            out.append(chain)
    return out


def bypass_problems(table: SavedTable, want: TableRules, v: str) -> list[str]:
    """What makes traffic skip our jumps in one table: a rule ahead of them, or a policy other than ACCEPT
    in a chain they are in."""
    problems: list[str] = []
    for chain in hooked_chains(want):
        exp = [line for line in want.jumps if line.split(" ", 2)[1] == chain]
        got = table.chain_rules(chain)
        # jumps into any chain of ours (the other redirect kind) may come first; nothing else may
        ahead = [line for line in got[: max((got.index(e) for e in exp if e in got), default=0)]
                 if not (rule_target(line) or "").startswith(OWNED_PREFIX)]
        if ahead:
            problems.append(f"{v} {table.name}: rule ahead of our jump in {chain}: '{ahead[0]}'")
        policy = table.chains.get(chain, "ACCEPT")
        if policy not in ("ACCEPT", "-"):
            problems.append(f"{v} {table.name}: chain {chain} policy is {policy}, expected ACCEPT")
    return problems


def _diff(what: str, expected: list[str], got: list[str]) -> str:
    for i, (e, g) in enumerate(zip(expected, got, strict=False)):
        if e != g:
            return f"{what} rule {i + 1} altered: expected '{e}', found '{g}'"
    if len(got) < len(expected):
        return f"{what} has {len(got)} rules, expected {len(expected)}; first missing: '{expected[len(got)]}'"
    return f"{what} has {len(got)} rules, expected {len(expected)}; first extra: '{got[len(expected)]}'"
