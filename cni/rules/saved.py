"""Read an iptables-save dump: its tables, chains and rules, and which of them are ours (by chain prefix).

Pure and stdlib only (the CNI plugin reads dumps on its hot path): no `dataclasses`, `typing` or `shlex`
at run time.
"""

from __future__ import annotations

from cni.contract.record import Record
from cni.rules import rule_text


class SavedTable(Record):
    """One table of a dump. Its dict and list fill up while the dump is read (the record is not hashable)."""

    __slots__ = ("name", "chains", "rules")  # noqa: RUF023 - field order (repr)
    name: str
    chains: dict[str, str]  # chain -> policy ("-" for user chains)
    rules: list[tuple[str, str]]  # (chain, "-A chain ...") in order

    def __init__(
        self, name: str, chains: dict[str, str] | None = None, rules: list[tuple[str, str]] | None = None
    ) -> None:
        self._init(name=name, chains={} if chains is None else chains, rules=[] if rules is None else rules)

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
        tokens = line.split()  # no quotes, escapes or odd whitespace
    else:
        tokens = rule_text.arguments(line)  # quoted arguments (our comments), split as iptables-restore does
    for i, tok in enumerate(tokens[:-1]):
        if tok in ("-j", "--jump", "-g", "--goto"):
            return tokens[i + 1]
    return None


class Owned(Record):
    """What of ours one table holds: chains (+ their rules) and jumps into them from other chains."""

    __slots__ = ("chains", "rules", "jumps")  # noqa: RUF023 - field order (repr)
    chains: list[str]
    rules: list[str]
    jumps: list[tuple[str, int, str]]  # (chain, 1-based position, line)

    def __init__(
        self,
        chains: list[str] | None = None,
        rules: list[str] | None = None,
        jumps: list[tuple[str, int, str]] | None = None,
    ) -> None:
        self._init(
            chains=[] if chains is None else chains,
            rules=[] if rules is None else rules,
            jumps=[] if jumps is None else jumps,
        )

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


def owned_all(tables: dict[str, SavedTable], prefix: str) -> dict[str, Owned]:
    found = {name: owned(t, prefix) for name, t in tables.items()}
    return {name: o for name, o in found.items() if not o.empty()}
