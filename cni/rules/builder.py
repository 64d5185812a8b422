"""Pure iptables rule builder: redirect specs + address family → rules in iptables-save canonical syntax.

Nothing here touches the kernel. Every rule is emitted exactly as `iptables-save` prints it back (option
order `-s -d -i -o -p`, then matches in order, then the target; `-p tcp --dport` written as
`-p tcp -m tcp --dport`), so CHECK can compare saved rules with these strings verbatim. The kernel
round-trip test proves the canonical form on both flavours.

Every rule describes itself: its last match is `-m comment --comment "headrace: <purpose>"` (right before
`-j`), so `iptables-save` in a pod shows what each of our rules is for. Both flavours print the comment
where it was given, quoted with double quotes (the text always holds a space).

Chains (all prefixed `HEADRACE_`, so removal finds exactly ours):
- sidecar (nat): HEADRACE_SC_INBOUND, HEADRACE_SC_IN_REDIRECT, HEADRACE_SC_OUTPUT, HEADRACE_SC_REDIRECT
- sidecar TPROXY mode (mangle): HEADRACE_SC_PRERT, HEADRACE_SC_INBOUND, HEADRACE_SC_DIVERT, HEADRACE_SC_TPROXY,
  HEADRACE_SC_OUTPUT (the nat table then keeps only the outbound part: no nat HEADRACE_SC_INBOUND)
- ambient (nat and mangle): HEADRACE_AM_PRERT, HEADRACE_AM_OUTPUT
- node side (nat, the agent's netns): HEADRACE_POSTROUTING
"""

from __future__ import annotations

from cni.contract.record import Record
from cni.contract.sidecar_params import (
    INTERCEPTION_REDIRECT,
    INTERCEPTION_TPROXY,
    SIDECAR_EXCLUDED_INBOUND,
    TPROXY_MARK,
    TPROXY_OUTBOUND_MARK,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:  # no typing/collections/dataclasses at run time: the CNI plugin imports this module
    import ipaddress
    from collections.abc import Iterable, Sequence

    from cni.contract.sidecar_params import SidecarParams
    from cni.contract.spec import AmbientSpec, Family, IPNetwork, SidecarSpec

OWNED_PREFIX = "HEADRACE_"
SIDECAR_PREFIX = "HEADRACE_SC_"
AMBIENT_PREFIX = "HEADRACE_AM_"
NODE_CHAIN = "HEADRACE_POSTROUTING"

SC_INBOUND = "HEADRACE_SC_INBOUND"
SC_IN_REDIRECT = "HEADRACE_SC_IN_REDIRECT"
SC_OUTPUT = "HEADRACE_SC_OUTPUT"
SC_REDIRECT = "HEADRACE_SC_REDIRECT"
SC_PRERT = "HEADRACE_SC_PRERT"
SC_DIVERT = "HEADRACE_SC_DIVERT"
SC_TPROXY = "HEADRACE_SC_TPROXY"
AM_PRERT = "HEADRACE_AM_PRERT"
AM_OUTPUT = "HEADRACE_AM_OUTPUT"

# Conntrack mark put on connections the node proxy made to the local app (Istio uses the same value), so
# the app's reply packets carry it and are never captured.
CONNMARK_PROXY = 0x111
# Inbound passthrough source: the sidecar forwards inbound traffic to the app from this address.
PASSTHROUGH_SOURCE = {4: "127.0.0.6/32", 6: "::6/128"}
LOOPBACK = {4: "127.0.0.1/32", 6: "::1/128"}
ANY_ADDRESS = {4: "0.0.0.0", 6: "::"}
DNS_PORT = 53
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


# ---------------------------------------------------------------- validation helpers


def _check_family(family: object) -> Family:
    if family == 4:
        return 4
    if family == 6:
        return 6
    raise ValueError(f"address family must be 4 or 6, not {family!r}")


def _check_port(port: object, what: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{what}: port must be an integer 1..65535, not {port!r}")
    return port


def _check_ports(ports: Iterable[object], what: str) -> tuple[int, ...]:
    seen: list[int] = []
    for p in ports:
        port = _check_port(p, what)
        if port not in seen:
            seen.append(port)
    return tuple(seen)


def _check_id(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 0xFFFFFFFF:
        raise ValueError(f"{what} must be an integer 0..4294967294, not {value!r}")
    return value


def _check_u32(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{what} must be a 32-bit unsigned integer, not {value!r}")
    return value


def _check_networks(nets: Iterable[object], family: Family, what: str) -> tuple[str, ...]:
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


def _ranges(spec_ranges: tuple[IPNetwork, ...] | None, family: Family, what: str) -> tuple[str, ...] | None:
    if spec_ranges is None:
        return None
    return _check_networks(spec_ranges, family, what)


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


def _dport(proto: str, port: int, negate: bool = False) -> str:
    return f"-m {proto} {'! ' if negate else ''}--dport {port}"


def _mark(mark: int, mask: int, negate: bool = False, kind: str = "mark") -> str:
    return f"-m {kind} {'! ' if negate else ''}--mark {mark:#x}/{mask:#x}"


def _full_mark(mark: int, negate: bool = False, kind: str = "mark") -> str:
    """A mark match with the full mask, as iptables-save prints it (no '/0xffffffff')."""
    return f"-m {kind} {'! ' if negate else ''}--mark {mark:#x}"


def _owner(kind: str, ident: int, negate: bool = False) -> str:
    return f"-m owner {'! ' if negate else ''}--{kind}-owner {ident}"


def _redirect(port: int) -> str:
    return f"--to-ports {port}"


# ---------------------------------------------------------------- sidecar


def sidecar_rules(spec: SidecarSpec | SidecarParams, family: Family) -> RuleSet:
    """Istio istio-iptables compatible interception for one family: inbound REDIRECT (nat) or, with
    ``interception_mode`` TPROXY, inbound TPROXY (mangle, see `_tproxy_mangle`); outbound REDIRECT."""
    fam = _check_family(family)
    uid = _check_id(spec.proxy_uid, "proxy uid")
    gid = _check_id(spec.proxy_gid, "proxy gid")
    outbound = _check_port(spec.outbound_port, "outbound proxy port")
    inbound = _check_port(spec.inbound_port, "inbound proxy port")
    exclude_in = _check_ports((*SIDECAR_EXCLUDED_INBOUND, *spec.exclude_inbound_ports), "excludeInboundPorts")
    include_in = (
        None if spec.include_inbound_ports is None else _check_ports(spec.include_inbound_ports, "includeInboundPorts")
    )
    exclude_out = _check_ports(spec.exclude_outbound_ports, "excludeOutboundPorts")
    exclude_ranges = _check_networks(spec.exclude_outbound_ranges, fam, "excludeOutboundIPRanges")
    include_ranges = _ranges(spec.include_outbound_ranges, fam, "includeOutboundIPRanges")
    lo_addr = LOOPBACK[fam]
    tproxy = uses_tproxy(spec)

    rules: list[str] = [
        rule(
            SC_REDIRECT,
            proto="tcp",
            purpose="sidecar outbound redirect",
            target="REDIRECT",
            target_args=_redirect(outbound),
        ),
        rule(
            SC_IN_REDIRECT,
            proto="tcp",
            purpose="sidecar inbound redirect",
            target="REDIRECT",
            target_args=_redirect(inbound),
        ),
    ]
    jumps: list[str] = []

    # Inbound: everything but the excluded ports, or only the included ones.
    capture_inbound = include_in is None or len(include_in) > 0
    if tproxy:
        pass  # inbound goes through mangle (below); nat keeps the outbound part only
    elif include_in is None:
        for port in exclude_in:
            rules.append(
                rule(
                    SC_INBOUND,
                    proto="tcp",
                    matches=[_dport("tcp", port)],
                    purpose="skip excluded inbound port",
                    target="RETURN",
                )
            )
        rules.append(rule(SC_INBOUND, proto="tcp", purpose="sidecar inbound capture", target=SC_IN_REDIRECT))
    else:
        for port in include_in:
            rules.append(
                rule(
                    SC_INBOUND,
                    proto="tcp",
                    matches=[_dport("tcp", port)],
                    purpose="sidecar included inbound port",
                    target=SC_IN_REDIRECT,
                )
            )
    if capture_inbound and not tproxy:
        jumps.append(rule("PREROUTING", proto="tcp", purpose="sidecar inbound", target=SC_INBOUND))

    # Outbound.
    for port in exclude_out:
        rules.append(
            rule(
                SC_OUTPUT,
                proto="tcp",
                matches=[_dport("tcp", port)],
                purpose="skip excluded outbound port",
                target="RETURN",
            )
        )
    # The sidecar's inbound forwarding to the app (source 127.0.0.6 / ::6) passes straight through.
    rules.append(
        rule(SC_OUTPUT, src=PASSTHROUGH_SOURCE[fam], out_if="lo", purpose="skip inbound passthrough", target="RETURN")
    )
    for kind, ident in (("uid", uid), ("gid", gid)):
        # The proxy calling its own pod's address over lo is inbound traffic: send it to 15006.
        rules.append(
            rule(
                SC_OUTPUT,
                dst=lo_addr,
                not_dst=True,
                out_if="lo",
                proto="tcp",
                matches=[_owner(kind, ident)],
                purpose=f"proxy {kind} to own pod ip",
                target=SC_IN_REDIRECT,
            )
        )
        # The app talking to itself over lo is not captured.
        rules.append(
            rule(
                SC_OUTPUT,
                out_if="lo",
                matches=[_owner(kind, ident, negate=True)],
                purpose=f"skip non-proxy {kind} over lo",
                target="RETURN",
            )
        )
        # The proxy's own outbound traffic goes straight out.
        rules.append(rule(SC_OUTPUT, matches=[_owner(kind, ident)], purpose=f"skip proxy {kind}", target="RETURN"))
    rules.append(rule(SC_OUTPUT, dst=lo_addr, purpose="skip loopback destination", target="RETURN"))
    for net in exclude_ranges:
        rules.append(rule(SC_OUTPUT, dst=net, purpose="skip excluded outbound range", target="RETURN"))
    if include_ranges is None:
        rules.append(rule(SC_OUTPUT, purpose="sidecar outbound capture", target=SC_REDIRECT))
    else:
        for net in include_ranges:
            rules.append(rule(SC_OUTPUT, dst=net, purpose="sidecar included outbound range", target=SC_REDIRECT))
    jumps.append(rule("OUTPUT", proto="tcp", purpose="sidecar outbound", target=SC_OUTPUT))

    nat = TableRules(
        table="nat",
        chains=(SC_IN_REDIRECT, SC_OUTPUT, SC_REDIRECT)
        if tproxy
        else (SC_INBOUND, SC_IN_REDIRECT, SC_OUTPUT, SC_REDIRECT),
        jumps=tuple(jumps),
        rules=tuple(rules),
    )
    if not tproxy:
        return RuleSet(family=fam, owner_prefix=SIDECAR_PREFIX, tables=(nat,))
    assert include_in is None or include_in  # uses_tproxy: some inbound capture
    mangle = _tproxy_mangle(fam, inbound, include_in, exclude_in, uid, gid)
    return RuleSet(family=fam, owner_prefix=SIDECAR_PREFIX, tables=(mangle, nat))


def interception_mode(spec: SidecarSpec | SidecarParams) -> str:
    mode = spec.interception_mode
    if mode not in (INTERCEPTION_REDIRECT, INTERCEPTION_TPROXY):
        raise ValueError(f"interception mode must be REDIRECT or TPROXY, not {mode!r}")
    return str(mode)


def uses_tproxy(spec: SidecarSpec | SidecarParams) -> bool:
    """TPROXY inbound rules (mangle) and policy routing are needed: TPROXY mode with some inbound capture.
    TPROXY mode without inbound capture (includeInboundPorts empty) is exactly REDIRECT mode's rules."""
    if interception_mode(spec) != INTERCEPTION_TPROXY:
        return False
    return spec.include_inbound_ports is None or len(spec.include_inbound_ports) > 0


def _tproxy_mangle(
    fam: Family, inbound: int, include_in: tuple[int, ...] | None, exclude_in: tuple[int, ...], uid: int, gid: int
) -> TableRules:
    """Inbound TPROXY interception (mangle), Istio's TPROXY mode in behaviour:

    - PREROUTING → PRERT → INBOUND: packets already marked TPROXY_MARK, the proxy's passthrough source on
      lo and other lo traffic not marked TPROXY_OUTBOUND_MARK are left alone; excluded ports return;
      packets of established connections are marked and accepted (DIVERT: the policy routing delivers them
      locally, to the proxy's socket); new connections are TPROXYed to the inbound port with the mark.
      Back in PRERT, a packet arriving with TPROXY_MARK (the proxy's original_src connection to the app)
      saves its mark on the connection.
    - OUTPUT (mangle): the proxy's own TCP to a non-loopback address over lo (its pod IP) is marked
      TPROXY_OUTBOUND_MARK (so INBOUND captures it); packets of connections marked TPROXY_MARK get the
      mark back (the app's replies to original_src connections are routed to the proxy, not out).
    """
    lo_addr = LOOPBACK[fam]
    full = 0xFFFFFFFF
    rules: list[str] = [
        rule(
            SC_DIVERT,
            purpose="mark diverted packet",
            target="MARK",
            target_args=f"--set-xmark {TPROXY_MARK:#x}/{full:#x}",
        ),
        rule(SC_DIVERT, purpose="accept diverted packet", target="ACCEPT"),
        rule(
            SC_TPROXY,
            dst=lo_addr,
            not_dst=True,
            proto="tcp",
            purpose="tproxy to inbound proxy",
            target="TPROXY",
            target_args=f"--on-port {inbound} --on-ip {ANY_ADDRESS[fam]} --tproxy-mark {TPROXY_MARK:#x}/{full:#x}",
        ),
        rule(SC_PRERT, proto="tcp", purpose="sidecar tproxy inbound", target=SC_INBOUND),
        rule(
            SC_PRERT,
            proto="tcp",
            matches=[_full_mark(TPROXY_MARK)],
            purpose="save tproxy mark on connection",
            target="CONNMARK",
            target_args=f"--save-mark --nfmask {full:#x} --ctmask {full:#x}",
        ),
        rule(
            SC_INBOUND,
            proto="tcp",
            matches=[_full_mark(TPROXY_MARK)],
            purpose="skip tproxy-marked packet",
            target="RETURN",
        ),
        rule(
            SC_INBOUND,
            src=PASSTHROUGH_SOURCE[fam],
            in_if="lo",
            proto="tcp",
            purpose="skip inbound passthrough",
            target="RETURN",
        ),
        rule(
            SC_INBOUND,
            in_if="lo",
            proto="tcp",
            matches=[_full_mark(TPROXY_OUTBOUND_MARK, negate=True)],
            purpose="skip lo traffic not from proxy",
            target="RETURN",
        ),
    ]
    established = "-m conntrack --ctstate RELATED,ESTABLISHED"
    if include_in is None:
        for port in exclude_in:
            rules.append(
                rule(
                    SC_INBOUND,
                    proto="tcp",
                    matches=[_dport("tcp", port)],
                    purpose="skip excluded inbound port",
                    target="RETURN",
                )
            )
        rules.append(
            rule(SC_INBOUND, proto="tcp", matches=[established], purpose="divert established inbound", target=SC_DIVERT)
        )
        rules.append(rule(SC_INBOUND, proto="tcp", purpose="tproxy new inbound", target=SC_TPROXY))
    else:
        for port in include_in:
            rules.append(
                rule(
                    SC_INBOUND,
                    proto="tcp",
                    matches=[_dport("tcp", port), established],
                    purpose="divert established included port",
                    target=SC_DIVERT,
                )
            )
            rules.append(
                rule(
                    SC_INBOUND,
                    proto="tcp",
                    matches=[_dport("tcp", port)],
                    purpose="tproxy new included port",
                    target=SC_TPROXY,
                )
            )
    rules.append(
        rule(
            SC_OUTPUT,
            out_if="lo",
            proto="tcp",
            matches=[_full_mark(TPROXY_MARK)],
            purpose="skip tproxy-marked over lo",
            target="RETURN",
        )
    )
    for kind, ident in (("uid", uid), ("gid", gid)):
        rules.append(
            rule(
                SC_OUTPUT,
                dst=lo_addr,
                not_dst=True,
                out_if="lo",
                proto="tcp",
                matches=[_owner(kind, ident)],
                purpose=f"mark proxy {kind} to own pod ip",
                target="MARK",
                target_args=f"--set-xmark {TPROXY_OUTBOUND_MARK:#x}/{full:#x}",
            )
        )
    rules.append(
        rule(
            SC_OUTPUT,
            proto="tcp",
            matches=[_full_mark(TPROXY_MARK, kind="connmark")],
            purpose="restore tproxy mark",
            target="CONNMARK",
            target_args=f"--restore-mark --nfmask {full:#x} --ctmask {full:#x}",
        )
    )
    return TableRules(
        table="mangle",
        chains=(SC_PRERT, SC_INBOUND, SC_DIVERT, SC_TPROXY, SC_OUTPUT),
        jumps=(
            rule("PREROUTING", proto="tcp", purpose="sidecar tproxy prerouting", target=SC_PRERT),
            rule("OUTPUT", proto="tcp", purpose="sidecar tproxy output", target=SC_OUTPUT),
        ),
        rules=tuple(rules),
    )


# ---------------------------------------------------------------- ambient (in-pod, node proxy)


def ambient_rules(spec: AmbientSpec, family: Family) -> RuleSet:
    """Istio in-pod (ztunnel) style interception for one family, REDIRECT based."""
    import ipaddress

    fam = _check_family(family)
    outbound = _check_port(spec.outbound_port, "outbound proxy port")
    inbound = _check_port(spec.inbound_port, "inbound proxy port")
    hbone = _check_port(spec.hbone_port, "HBONE port")
    dns = _check_port(spec.dns_port, "DNS proxy port")
    mark = _check_u32(spec.mark, "proxy mark")
    mask = _check_u32(spec.mark_mask, "proxy mark mask")
    if mask == 0 or mark & ~mask:
        raise ValueError(f"proxy mark {mark:#x} does not fit its mask {mask:#x}")
    probe = spec.probe_snat_v4 if fam == 4 else spec.probe_snat_v6
    if not isinstance(probe, ipaddress.IPv4Address | ipaddress.IPv6Address) or probe.version != fam:
        raise ValueError(f"probe source for IPv{fam} must be an IPv{fam} address, not {probe!r}")
    probe_net = f"{probe}/{probe.max_prefixlen}"
    exclude_in = _check_ports(spec.exclude_inbound_ports, "excluded inbound ports")
    exclude_out = _check_ports(spec.exclude_outbound_ports, "excluded outbound ports")
    exclude_ranges = _check_networks(spec.exclude_outbound_ranges, fam, "excluded outbound ranges")
    lo_addr = LOOPBACK[fam]
    connmark = CONNMARK_PROXY & mask

    mangle = TableRules(
        table="mangle",
        chains=(AM_PRERT, AM_OUTPUT),
        jumps=(
            rule("PREROUTING", purpose="ambient prerouting", target=AM_PRERT),
            rule("OUTPUT", purpose="ambient output", target=AM_OUTPUT),
        ),
        rules=(
            # Packets of the proxy's own connections (to the local app over lo) tag their conntrack entry…
            rule(
                AM_PRERT,
                matches=[_mark(mark, mask)],
                purpose="tag proxy connection",
                target="CONNMARK",
                target_args=f"--set-xmark {connmark:#x}/{mask:#x}",
            ),
            # …and the app's replies on those connections get the tag as packet mark (never captured).
            rule(
                AM_OUTPUT,
                matches=[_mark(connmark, mask, kind="connmark")],
                purpose="restore proxy connection mark",
                target="CONNMARK",
                target_args="--restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
            ),
        ),
    )

    pre: list[str] = [rule(AM_PRERT, src=probe_net, proto="tcp", purpose="accept kubelet probe", target="ACCEPT")]
    for port in exclude_in:
        pre.append(
            rule(
                AM_PRERT,
                proto="tcp",
                matches=[_dport("tcp", port)],
                purpose="skip excluded inbound port",
                target="RETURN",
            )
        )
    pre.append(
        rule(
            AM_PRERT,
            dst=lo_addr,
            not_dst=True,
            proto="tcp",
            matches=[_dport("tcp", hbone, negate=True), _mark(mark, mask, negate=True)],
            purpose="ambient inbound redirect",
            target="REDIRECT",
            target_args=_redirect(inbound),
        )
    )

    out: list[str] = [
        rule(AM_OUTPUT, dst=probe_net, proto="tcp", purpose="accept kubelet probe reply", target="ACCEPT")
    ]
    if spec.capture_dns:
        for proto in ("udp", "tcp"):
            out.append(
                rule(
                    AM_OUTPUT,
                    out_if="lo",
                    not_out_if=True,
                    proto=proto,
                    matches=[_dport(proto, DNS_PORT), _mark(mark, mask, negate=True)],
                    purpose=f"ambient {proto} dns redirect",
                    target="REDIRECT",
                    target_args=_redirect(dns),
                )
            )
    out.append(
        rule(
            AM_OUTPUT,
            proto="tcp",
            matches=[_mark(connmark, mask)],
            purpose="accept proxy connection reply",
            target="ACCEPT",
        )
    )
    out.append(
        rule(
            AM_OUTPUT,
            dst=lo_addr,
            not_dst=True,
            out_if="lo",
            purpose="accept pod-local traffic over lo",
            target="ACCEPT",
        )
    )
    for port in exclude_out:
        out.append(
            rule(
                AM_OUTPUT,
                proto="tcp",
                matches=[_dport("tcp", port)],
                purpose="skip excluded outbound port",
                target="RETURN",
            )
        )
    for net in exclude_ranges:
        out.append(rule(AM_OUTPUT, dst=net, purpose="skip excluded outbound range", target="RETURN"))
    out.append(
        rule(
            AM_OUTPUT,
            dst=lo_addr,
            not_dst=True,
            proto="tcp",
            matches=[_mark(mark, mask, negate=True)],
            purpose="ambient outbound redirect",
            target="REDIRECT",
            target_args=_redirect(outbound),
        )
    )
    nat = TableRules(
        table="nat",
        chains=(AM_PRERT, AM_OUTPUT),
        jumps=(
            rule("PREROUTING", purpose="ambient prerouting", target=AM_PRERT),
            rule("OUTPUT", purpose="ambient output", target=AM_OUTPUT),
        ),
        rules=(*pre, *out),
    )
    return RuleSet(family=fam, owner_prefix=AMBIENT_PREFIX, tables=(mangle, nat))


# ---------------------------------------------------------------- node side: kubelet probe SNAT


def parse_pod_ips(pod_ips: Iterable[object]) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """Validate pod IPs (strings or ipaddress objects); sorted, deduplicated."""
    import ipaddress

    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for ip in pod_ips:
        if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
            found.add(ip)
            continue
        if not isinstance(ip, str):
            raise ValueError(f"pod IP must be a string, not {ip!r}")
        try:
            found.add(ipaddress.ip_address(ip))
        except ValueError:
            raise ValueError(f"invalid pod IP {ip!r}") from None
    return tuple(sorted(found, key=lambda a: (a.version, int(a))))


def node_probe_rules(
    pod_ips: Iterable[object],
    family: Family,
    snat_source: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
) -> RuleSet:
    """Host-originated TCP to each enrolled pod IP is SNATed to the probe address (nat POSTROUTING).

    `-m owner --socket-exists` limits it to locally generated packets (the kubelet), not forwarded ones.
    """
    from cni.contract.spec import PROBE_SNAT_V4, PROBE_SNAT_V6

    fam = _check_family(family)
    source = snat_source if snat_source is not None else (PROBE_SNAT_V4 if fam == 4 else PROBE_SNAT_V6)
    if source.version != fam:
        raise ValueError(f"SNAT source {source} is not an IPv{fam} address")
    rules = tuple(
        rule(
            NODE_CHAIN,
            dst=f"{ip}/{ip.max_prefixlen}",
            proto="tcp",
            matches=["-m owner --socket-exists"],
            purpose="snat kubelet probe",
            target="SNAT",
            target_args=f"--to-source {source}",
        )
        for ip in parse_pod_ips(pod_ips)
        if ip.version == fam
    )
    nat = TableRules(
        table="nat",
        chains=(NODE_CHAIN,),
        jumps=(rule("POSTROUTING", purpose="node probe snat", target=NODE_CHAIN),),
        rules=rules,
    )
    return RuleSet(family=fam, owner_prefix=NODE_CHAIN, tables=(nat,))
