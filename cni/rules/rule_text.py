"""iptables rules as text in iptables-save canonical syntax, and the records that hold a rule set. Pure.

Every rule is emitted exactly as `iptables-save` prints it back (option order `-s -d -i -o -p`, then
matches in order, then the target; `-p tcp --dport` written as `-p tcp -m tcp --dport`), so CHECK can
compare saved rules with these strings verbatim. The kernel round-trip test proves the canonical form on
both flavours.

Every rule describes itself: its last match is `-m comment --comment "headrace: <purpose>"` (right before
`-j`), so `iptables-save` in a pod shows what each of our rules is for. Both flavours print the comment
where it was given, quoted with double quotes (the text always holds a space).

Also here: the validation of the values that go into rules (ports, ids, marks, networks, family), shared
by the sidecar, ambient and node-probe builders.
"""

from __future__ import annotations

from cni.contract.record import Record

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:  # no typing/collections at run time: the CNI plugin imports this module
    from collections.abc import Iterable, Sequence

    from cni.contract.kinds import Family, IPNetwork

OWNED_PREFIX = "HEADRACE_"
# Inbound passthrough source: the sidecar forwards inbound traffic to the app from this address.
PASSTHROUGH_SOURCE = {4: "127.0.0.6/32", 6: "::6/128"}
LOOPBACK = {4: "127.0.0.1/32", 6: "::1/128"}
ANY_ADDRESS = {4: "0.0.0.0", 6: "::"}
COMMENT_PREFIX = "headrace: "
COMMENT_MAX = 255  # xt_comment holds 256 bytes, NUL included
# Characters iptables-save would escape inside a quoted comment (or that cannot be in one at all).
_COMMENT_FORBIDDEN = frozenset("\"\\'") | frozenset(chr(c) for c in range(0x20)) | {chr(0x7F)}


class TableRules(Record):
    """Our part of one table: chains we own, our jump rules in built-in chains, our chains' rules."""

    __slots__ = ("table", "chains", "jumps", "rules")  # noqa: RUF023 - field order (repr)
    table: str
    chains: tuple[str, ...]
    jumps: tuple[str, ...]  # "-A PREROUTING ... -j HEADRACE_..." (inserted at the top of the chain)
    rules: tuple[str, ...]  # "-A HEADRACE_... ..." in order

    def __init__(self, table: str, chains: tuple[str, ...], jumps: tuple[str, ...], rules: tuple[str, ...]) -> None:
        self._init(table=table, chains=chains, jumps=jumps, rules=rules)


class RuleSet(Record):
    """All our rules of one address family; `owner_prefix` names the chains this set replaces."""

    __slots__ = ("family", "owner_prefix", "tables")
    family: Family
    owner_prefix: str
    tables: tuple[TableRules, ...]

    def __init__(self, family: Family, owner_prefix: str, tables: tuple[TableRules, ...]) -> None:
        self._init(family=family, owner_prefix=owner_prefix, tables=tables)

    def table(self, name: str) -> TableRules | None:
        for t in self.tables:
            if t.table == name:
                return t
        return None

    def render(self) -> str:
        """iptables-save-like text (our chains, jumps and rules per table); used for golden files."""
        out = [f"# headrace {self.owner_prefix}* IPv{self.family}"]
        for t in self.tables:
            out.append(f"*{t.table}")
            out.extend(f":{c} - [0:0]" for c in t.chains)
            out.extend(t.jumps)
            out.extend(t.rules)
            out.append("COMMIT")
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------- validation


def check_family(family: object) -> Family:
    if family == 4:
        return 4
    if family == 6:
        return 6
    raise ValueError(f"address family must be 4 or 6, not {family!r}")


def check_port(port: object, what: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{what}: port must be an integer 1..65535, not {port!r}")
    return port


def check_ports(ports: Iterable[object], what: str) -> tuple[int, ...]:
    seen: list[int] = []
    for p in ports:
        port = check_port(p, what)
        if port not in seen:
            seen.append(port)
    return tuple(seen)


def check_id(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 0xFFFFFFFF:
        raise ValueError(f"{what} must be an integer 0..4294967294, not {value!r}")
    return value


def check_u32(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{what} must be a 32-bit unsigned integer, not {value!r}")
    return value


def check_networks(nets: Iterable[object], family: Family, what: str) -> tuple[str, ...]:
    out: list[str] = []
    for n in nets:
        import ipaddress  # only with ranges (a pod without range annotations never loads it)

        if not isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise ValueError(f"{what}: expected an IP network, not {n!r}")
        if n.version != family:
            continue
        text = n.with_prefixlen
        if text not in out:
            out.append(text)
    return tuple(out)


def check_optional_networks(
    spec_ranges: tuple[IPNetwork, ...] | None, family: Family, what: str
) -> tuple[str, ...] | None:
    if spec_ranges is None:
        return None
    return check_networks(spec_ranges, family, what)


# ---------------------------------------------------------------- canonical rule text


def rule(
    chain: str,
    *,
    src: str | None = None,
    dst: str | None = None,
    not_dst: bool = False,
    in_if: str | None = None,
    out_if: str | None = None,
    not_out_if: bool = False,
    proto: str | None = None,
    matches: Sequence[str] = (),
    purpose: str,
    target: str,
    target_args: str = "",
) -> str:
    """One rule in iptables-save order: -A chain [-s] [[!] -d] [-i] [[!] -o] [-p] matches, the comment
    naming its purpose, -j target args."""
    parts = [f"-A {chain}"]
    if src is not None:
        parts.append(f"-s {src}")
    if dst is not None:
        parts.append(f"{'! ' if not_dst else ''}-d {dst}")
    if in_if is not None:
        parts.append(f"-i {in_if}")
    if out_if is not None:
        parts.append(f"{'! ' if not_out_if else ''}-o {out_if}")
    if proto is not None:
        parts.append(f"-p {proto}")
    parts.extend(matches)
    parts.append(comment(purpose))
    parts.append(f"-j {target}")
    if target_args:
        parts.append(target_args)
    return " ".join(parts)


def comment(purpose: str) -> str:
    """The comment match of a rule, as iptables-save prints it: `-m comment --comment "headrace: ..."`."""
    text = COMMENT_PREFIX + purpose
    if not purpose or _COMMENT_FORBIDDEN.intersection(text) or len(text.encode()) > COMMENT_MAX:
        raise ValueError(f"rule purpose {purpose!r}: 1..{COMMENT_MAX - len(COMMENT_PREFIX)} bytes, no quotes")
    return f'-m comment --comment "{text}"'


def dport_match(proto: str, port: int, negate: bool = False) -> str:
    return f"-m {proto} {'! ' if negate else ''}--dport {port}"


def mark_match(mark: int, mask: int, negate: bool = False, kind: str = "mark") -> str:
    return f"-m {kind} {'! ' if negate else ''}--mark {mark:#x}/{mask:#x}"


def full_mark_match(mark: int, negate: bool = False, kind: str = "mark") -> str:
    """A mark match with the full mask, as iptables-save prints it (no '/0xffffffff')."""
    return f"-m {kind} {'! ' if negate else ''}--mark {mark:#x}"


def owner_match(kind: str, ident: int, negate: bool = False) -> str:
    return f"-m owner {'! ' if negate else ''}--{kind}-owner {ident}"


def to_ports(port: int) -> str:
    return f"--to-ports {port}"


def arguments(line: str) -> list[str]:
    """A rule line split into its arguments the way iptables-restore splits it, for lines iptables-save
    printed: whitespace separates; a double-quoted string (our comments) is one argument, inside which a
    backslash takes the next character literally (iptables-save writes `\\"`, `\\\\` and `\\'` there);
    nothing else quotes. For such lines this is what `shlex.split` gives (and means `\\'` the way
    iptables-restore does), without importing `shlex` and `re`: a save parser that meets our quoted
    comments on the plugin's path can split them cheaply."""
    out: list[str] = []
    current: list[str] = []
    started = quoted = escaped = False
    for ch in line:
        if quoted:
            if escaped:
                current.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
            else:
                current.append(ch)
        elif ch == '"':
            quoted = started = True
        elif ch in " \t\n\r\v\f":
            if started:
                out.append("".join(current))
                current, started = [], False
        else:
            current.append(ch)
            started = True
    if started:
        out.append("".join(current))
    return out
