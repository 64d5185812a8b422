"""nftables rules as text in the canonical form `nft list table` prints, and the records that hold a table. Pure.

headrace keeps everything of a pod in ONE table, `table inet headrace` (both address families in one
ruleset). The text the builders produce is exactly what `nft list table inet headrace` prints back
(tab indentation, a blank line between chains, marks as 8 hex digits, dependencies such as `meta l4proto
tcp` before `tcp dport` left out), so CHECK and the agent's drift check compare the kernel's listing with
the builder's text line for line; the kernel round-trip test proves it for every golden scenario.

Every rule names its purpose in a trailing `comment "headrace: <purpose>"` (as the iptables rules do).

A table is installed, replaced and removed as one nftables transaction: `replace_text` declares the table
(a no-op when it exists), deletes it and declares it again with its chains and rules, so whatever was
there is swapped for the new ruleset atomically; `remove_text` declares and deletes it (idempotent).
"""

from __future__ import annotations

from cni.contract.record import Record
from cni.rules.rule_text import COMMENT_PREFIX, comment

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Iterable

    from cni.contract.kinds import Family

TABLE_FAMILY = "inet"
POD_TABLE = "headrace"  # the pod's table: sidecar or ambient rules
NODE_TABLE = "headrace_node"  # the node side (probe SNAT), in the netns the agent runs in
ADDR = {4: "ip", 6: "ip6"}  # the address expression of a family
NFPROTO = {4: "ipv4", 6: "ipv6"}
LOOPBACK = {4: "127.0.0.1", 6: "::1"}
PASSTHROUGH_SOURCE = {4: "127.0.0.6", 6: "::6"}
# base-chain priorities, as nft prints them (the iptables nat tables hook at -100, mangle at -150)
PRIO_DSTNAT = "dstnat"  # -100 in prerouting
PRIO_NAT_OUTPUT = "-100"  # nat output: the iptables nat OUTPUT priority (nft has no name for it there)
PRIO_SRCNAT = "srcnat"  # 100 in postrouting
PRIO_MANGLE = "mangle"  # -150


class Chain(Record):
    """One chain of our table: a base chain (`hook` = "type nat hook prerouting priority dstnat") or a
    regular one (hook None), and its rules in order (canonical text, comment included)."""

    __slots__ = ("hook", "name", "rules")
    name: str
    hook: str | None
    rules: tuple[str, ...]

    def __init__(self, name: str, hook: str | None, rules: tuple[str, ...]) -> None:
        self._init(name=name, hook=hook, rules=rules)


class NftTable(Record):
    """A whole table of ours: its name (family `inet`) and its chains, in the order nft lists them."""

    __slots__ = ("chains", "name")
    name: str
    chains: tuple[Chain, ...]

    def __init__(self, name: str, chains: tuple[Chain, ...]) -> None:
        self._init(name=name, chains=chains)

    def chain(self, name: str) -> Chain | None:
        for c in self.chains:
            if c.name == name:
                return c
        return None

    def render(self) -> str:
        """The table exactly as `nft list table inet <name>` prints it."""
        blocks: list[str] = []
        for c in self.chains:
            lines = [f"\tchain {c.name} {{"]
            if c.hook is not None:
                lines.append(f"\t\t{c.hook}; policy accept;")
            lines.extend(f"\t\t{r}" for r in c.rules)
            lines.append("\t}")
            blocks.append("\n".join(lines))
        body = "\n\n".join(blocks)
        return (
            f"table {TABLE_FAMILY} {self.name} {{\n{body}\n}}\n"
            if body
            else f"table {TABLE_FAMILY} {self.name} {{\n}}\n"
        )


def replace_text(table: NftTable) -> str:
    """One transaction that swaps whatever table of that name is there for `table` (or creates it)."""
    return f"table {TABLE_FAMILY} {table.name} {{}}\ndelete table {TABLE_FAMILY} {table.name}\n{table.render()}"


def create_text(table: NftTable) -> str:
    """One transaction that creates `table` and fails (changing nothing) if a table of that name exists."""
    return f"create table {TABLE_FAMILY} {table.name}\n{table.render()}"


def remove_text(name: str = POD_TABLE) -> str:
    """One transaction that deletes our table whether or not it exists."""
    return f"table {TABLE_FAMILY} {name} {{}}\ndelete table {TABLE_FAMILY} {name}\n"


def list_command(name: str = POD_TABLE) -> str:
    return f"list table {TABLE_FAMILY} {name}"


def hook(kind: str, hook_name: str, priority: str) -> str:
    return f"type {kind} hook {hook_name} priority {priority}"


# ---------------------------------------------------------------- rule text


def nft_comment(purpose: str) -> str:
    """`comment "headrace: <purpose>"` (same validation as the iptables comment: no quotes, ≤ 255 bytes)."""
    comment(purpose)  # validates
    return f'comment "{COMMENT_PREFIX}{purpose}"'


def nrule(*parts: str, purpose: str) -> str:
    """A rule: its expressions and statements in order (empty parts dropped), then the comment."""
    return " ".join([p for p in parts if p] + [nft_comment(purpose)])


def base_chain(name: str, kind: str, hook_name: str, priority: str, target: str, *matches: str,
               purpose: str) -> Chain:
    """A base chain whose one rule sends what `matches` select to our regular chain `target`."""
    return Chain(name, hook(kind, hook_name, priority), (nrule(*matches, f"jump {target}", purpose=purpose),))


def family_guard(families: Iterable[Family]) -> str:
    """The match a base chain's jump carries so that only the pod's families are redirected: nothing with
    both (an inet table sees only IPv4 and IPv6), `meta nfproto ipv4` / `ipv6` with one."""
    fams = tuple(families)
    if 4 in fams and 6 in fams:
        return ""
    return f"meta nfproto {NFPROTO[fams[0]]}"


def addr(fam: Family, which: str, value: str, negate: bool = False) -> str:
    """`ip daddr 10.0.0.0/8`, `ip6 saddr != ::1`: which is "saddr" or "daddr"; host prefixes are written
    as plain addresses (as nft prints them)."""
    return f"{ADDR[fam]} {which} {'!= ' if negate else ''}{host_or_net(value)}"


def host_or_net(value: str) -> str:
    address, _, plen = value.partition("/")
    if plen and int(plen) == (32 if ":" not in address else 128):
        return address
    return value


def dport(proto: str, port: int, negate: bool = False) -> str:
    return f"{proto} dport {'!= ' if negate else ''}{port}"


def hex32(value: int) -> str:
    return f"0x{value:08x}"


def mark_eq(mark: int, mask: int = 0xFFFFFFFF, negate: bool = False, kind: str = "meta mark") -> str:
    """`meta mark 0x00000539`, `meta mark & 0x00000fff != 0x00000539`, `ct mark ...` (kind "ct mark")."""
    op = "!= " if negate else ""
    if mask == 0xFFFFFFFF:
        return f"{kind} {op}{hex32(mark)}"
    return f"{kind} & {hex32(mask)} {'!=' if negate else '=='} {hex32(mark)}"


def set_masked(kind: str, value: int, mask: int) -> str:
    """`ct mark set ct mark & 0xfffff111 | 0x00000111`: the bits of mask become value (nft prints the
    and-operand with value's bits set)."""
    keep = (~mask & 0xFFFFFFFF) | value
    return f"{kind} set {kind} & {hex32(keep)} | {hex32(value)}"


def owner(kind: str, ident: int, negate: bool = False) -> str:
    return f"meta sk{kind} {'!= ' if negate else ''}{ident}"


def redirect_to(port: int) -> str:
    return f"redirect to :{port}"


def oif(name: str, negate: bool = False) -> str:
    return f'oifname {"!= " if negate else ""}"{name}"'


def iif(name: str, negate: bool = False) -> str:
    return f'iifname {"!= " if negate else ""}"{name}"'
