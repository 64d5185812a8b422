"""Sidecar interception as nftables chains (the same behaviour as the iptables rules in `sidecar`). Pure.

One `table inet headrace` for the pod's families. REDIRECT mode: base chains `nat_prerouting` (priority
dstnat) and `nat_output` (-100) jump to `sc_inbound` / `sc_output`, which end in `sc_in_redirect` (→
15006) and `sc_redirect` (→ 15001). TPROXY mode adds `mangle_prerouting` (filter, priority mangle) →
`sc_prert` → `sc_tp_inbound` → `sc_divert` / `sc_tproxy`, and `mangle_output` (route, priority mangle) →
`sc_tp_output`; the nat part then keeps only the outbound chains. Rules of one address family only (an
address match) are emitted for the pod's families; family-independent rules once.

As istio-iptables: the proxy's HBONE port 15008 is never captured inbound, and the proxy's own connections
to its pod's IP go to the inbound port except those to 15008. excludeInterfaces: traffic arriving on or
leaving via them is not captured; kubevirtInterfaces: TCP arriving on them is a VM's outbound traffic
(to the outbound port, or only to the include ranges), the rest of their traffic is not captured.

`sidecar_inputs` is the one place that turns a spec into the validated values the rules use: a new
spec field is read there and used by the rule that needs it.
"""

from __future__ import annotations

from cni.contract.constants import SIDECAR_EXCLUDED_INBOUND, SIDECAR_HBONE_PORT, TPROXY_MARK, TPROXY_OUTBOUND_MARK
from cni.contract.record import Record
from cni.rules import nft_text as t
from cni.rules.rule_text import check_id, check_networks, check_optional_networks, check_port, check_ports
from cni.rules.sidecar import uses_tproxy
from cni.rules.sidecar_interfaces import check_interfaces

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from cni.contract.kinds import Family
    from cni.contract.sidecar_params import SidecarParams
    from cni.contract.spec import SidecarSpec

HBONE_PORT = SIDECAR_HBONE_PORT
SC_INBOUND = "sc_inbound"
SC_IN_REDIRECT = "sc_in_redirect"
SC_OUTPUT = "sc_output"
SC_REDIRECT = "sc_redirect"
SC_PRERT = "sc_prert"
SC_TP_INBOUND = "sc_tp_inbound"
SC_DIVERT = "sc_divert"
SC_TPROXY = "sc_tproxy"
SC_TP_OUTPUT = "sc_tp_output"


class SidecarInputs(Record):
    """A sidecar spec's validated values, per family where they are addresses."""

    __slots__ = (
        "exclude_ifs",
        "exclude_in",
        "exclude_out",
        "exclude_ranges",
        "families",
        "gid",
        "inbound",
        "include_in",
        "include_out",
        "include_ranges",
        "kubevirt_ifs",
        "outbound",
        "tproxy",
        "uid",
    )
    families: tuple[Family, ...]
    uid: int
    gid: int
    outbound: int
    inbound: int
    exclude_in: tuple[int, ...]
    include_in: tuple[int, ...] | None
    exclude_out: tuple[int, ...]
    exclude_ranges: dict[Family, tuple[str, ...]]
    include_ranges: dict[Family, tuple[str, ...] | None]
    include_out: tuple[int, ...]
    exclude_ifs: tuple[str, ...]
    kubevirt_ifs: tuple[str, ...]
    tproxy: bool

    def __init__(self, **fields: object) -> None:
        self._init(**fields)


def sidecar_inputs(spec: SidecarSpec | SidecarParams, families: tuple[Family, ...]) -> SidecarInputs:
    """Validate every field of the spec the rules use (ValueError naming the field)."""
    include_in = spec.include_inbound_ports
    return SidecarInputs(
        families=families,
        uid=check_id(spec.proxy_uid, "proxy uid"),
        gid=check_id(spec.proxy_gid, "proxy gid"),
        outbound=check_port(spec.outbound_port, "outbound proxy port"),
        inbound=check_port(spec.inbound_port, "inbound proxy port"),
        exclude_in=check_ports((*SIDECAR_EXCLUDED_INBOUND, *spec.exclude_inbound_ports), "excludeInboundPorts"),
        include_in=None if include_in is None else check_ports(include_in, "includeInboundPorts"),
        exclude_out=check_ports(spec.exclude_outbound_ports, "excludeOutboundPorts"),
        exclude_ranges={
            f: check_networks(spec.exclude_outbound_ranges, f, "excludeOutboundIPRanges") for f in families
        },
        include_ranges={
            f: check_optional_networks(spec.include_outbound_ranges, f, "includeOutboundIPRanges") for f in families
        },
        include_out=check_ports(spec.include_outbound_ports, "includeOutboundPorts"),
        exclude_ifs=check_interfaces(spec.exclude_interfaces, "excludeInterfaces"),
        kubevirt_ifs=check_interfaces(spec.kubevirt_interfaces, "kubevirtInterfaces"),
        tproxy=uses_tproxy(spec),
    )


def sidecar_chains(spec: SidecarSpec | SidecarParams, families: tuple[Family, ...]) -> tuple[t.Chain, ...]:
    """The pod table's chains for a sidecar pod (REDIRECT or TPROXY inbound), in listing order."""
    inp = sidecar_inputs(spec, families)
    guard = t.family_guard(families)
    capture_inbound = inp.include_in is None or len(inp.include_in) > 0
    nat_inbound = (capture_inbound and not inp.tproxy) or bool(inp.kubevirt_ifs)
    chains: list[t.Chain] = []

    def base(name: str, kind: str, hook: str, prio: str, target: str, purpose: str) -> None:
        chains.append(t.base_chain(name, kind, hook, prio, target, guard, "meta l4proto tcp", purpose=purpose))

    if inp.tproxy:
        base("mangle_prerouting", "filter", "prerouting", t.PRIO_MANGLE, SC_PRERT, "sidecar tproxy prerouting")
        base("mangle_output", "route", "output", t.PRIO_MANGLE, SC_TP_OUTPUT, "sidecar tproxy output")
    if nat_inbound:
        base("nat_prerouting", "nat", "prerouting", t.PRIO_DSTNAT, SC_INBOUND, "sidecar inbound")
    base("nat_output", "nat", "output", t.PRIO_NAT_OUTPUT, SC_OUTPUT, "sidecar outbound")
    if nat_inbound:
        chains.append(t.Chain(SC_INBOUND, None, _nat_inbound(inp, capture_inbound)))
    chains.append(
        t.Chain(
            SC_IN_REDIRECT,
            None,
            (t.nrule("meta l4proto tcp", t.redirect_to(inp.inbound), purpose="sidecar inbound redirect"),),
        )
    )
    chains.append(t.Chain(SC_OUTPUT, None, _nat_output(inp)))
    chains.append(
        t.Chain(
            SC_REDIRECT,
            None,
            (t.nrule("meta l4proto tcp", t.redirect_to(inp.outbound), purpose="sidecar outbound redirect"),),
        )
    )
    if inp.tproxy:
        chains.extend(_tproxy_chains(inp))
    return tuple(chains)


def _kubevirt(inp: SidecarInputs, redirect: bool) -> list[str]:
    """Per kubevirt interface: its TCP to the outbound redirect (every destination, or the include ranges;
    redirect False: none, TPROXY's mangle part), then a return for the rest of its traffic."""
    rules: list[str] = []
    for name in inp.kubevirt_ifs:
        if redirect and all(inp.include_ranges[f] is None for f in inp.families):
            rules.append(t.nrule(t.iif(name), f"jump {SC_REDIRECT}", purpose="kubevirt interface outbound"))
        elif redirect:
            rules.extend(
                t.nrule(t.addr(f, "daddr", net), t.iif(name), f"jump {SC_REDIRECT}",
                        purpose="kubevirt interface outbound range")
                for f in inp.families
                for net in inp.include_ranges[f] or ()
            )  # fmt: skip
        rules.append(t.nrule(t.iif(name), "return", purpose="kubevirt interface not inbound"))
    return rules


def _nat_inbound(inp: SidecarInputs, capture_inbound: bool) -> tuple[str, ...]:
    """Inbound REDIRECT: kubevirt interfaces first; then (unless TPROXY mode or no inbound capture) the
    excluded interfaces, 15008, and everything but the excluded ports, or only the included ones."""
    rules = _kubevirt(inp, redirect=True)
    if inp.tproxy or not capture_inbound:
        return tuple(rules)
    rules.extend(t.nrule(t.iif(name), "return", purpose="skip excluded interface") for name in inp.exclude_ifs)
    rules.append(t.nrule(t.dport("tcp", HBONE_PORT), "return", purpose="skip hbone port"))
    if inp.include_in is None:
        rules.extend(
            t.nrule(t.dport("tcp", port), "return", purpose="skip excluded inbound port")
            for port in inp.exclude_in
            if port != HBONE_PORT
        )
        rules.append(t.nrule(f"jump {SC_IN_REDIRECT}", purpose="sidecar inbound capture"))
        return tuple(rules)
    rules.extend(
        t.nrule(t.dport("tcp", port), f"jump {SC_IN_REDIRECT}", purpose="sidecar included inbound port")
        for port in inp.include_in
        if port != HBONE_PORT
    )
    return tuple(rules)


def _nat_output(inp: SidecarInputs) -> tuple[str, ...]:
    """Outbound REDIRECT, in the iptables order (docs/iptables.md): excluded interfaces and ports, the
    passthrough source, the proxy's own-pod connections (not 15008), the app over lo, the proxy, loopback,
    excluded ranges, included ports, capture."""
    fams = inp.families
    rules = [t.nrule(t.oif(name), "return", purpose="skip excluded interface") for name in inp.exclude_ifs]
    rules.extend(
        t.nrule(t.dport("tcp", port), "return", purpose="skip excluded outbound port") for port in inp.exclude_out
    )
    rules.extend(
        t.nrule(t.oif("lo"), t.addr(f, "saddr", t.PASSTHROUGH_SOURCE[f]), "return", purpose="skip inbound passthrough")
        for f in fams
    )
    for kind, ident in (("uid", inp.uid), ("gid", inp.gid)):
        rules.extend(
            t.nrule(
                t.oif("lo"),
                t.addr(f, "daddr", t.LOOPBACK[f], negate=True),
                t.dport("tcp", HBONE_PORT, negate=True),
                t.owner(kind, ident),
                f"jump {SC_IN_REDIRECT}",
                purpose=f"proxy {kind} to own pod ip",
            )
            for f in fams
        )
        rules.append(
            t.nrule(t.oif("lo"), t.owner(kind, ident, negate=True), "return", purpose=f"skip non-proxy {kind} over lo")
        )
        rules.append(t.nrule(t.owner(kind, ident), "return", purpose=f"skip proxy {kind}"))
    rules.extend(
        t.nrule(t.addr(f, "daddr", t.LOOPBACK[f]), "return", purpose="skip loopback destination") for f in fams
    )
    for f in fams:
        rules.extend(
            t.nrule(t.addr(f, "daddr", net), "return", purpose="skip excluded outbound range")
            for net in inp.exclude_ranges[f]
        )
    rules.extend(
        t.nrule(t.dport("tcp", port), f"jump {SC_REDIRECT}", purpose="sidecar included outbound port")
        for port in inp.include_out
    )
    if all(inp.include_ranges[f] is None for f in fams):
        rules.append(t.nrule(f"jump {SC_REDIRECT}", purpose="sidecar outbound capture"))
    else:  # one spec: every family has a list (possibly empty: no capture of that family)
        for f in fams:
            rules.extend(
                t.nrule(t.addr(f, "daddr", net), f"jump {SC_REDIRECT}", purpose="sidecar included outbound range")
                for net in inp.include_ranges[f] or ()
            )
    return tuple(rules)


def _tproxy_chains(inp: SidecarInputs) -> tuple[t.Chain, ...]:
    """Inbound TPROXY (Istio's TPROXY mode in behaviour; the iptables mangle chains of `sidecar`)."""
    fams = inp.families
    mark = t.hex32(TPROXY_MARK)
    divert = (
        t.nrule(f"meta mark set {mark}", purpose="mark diverted packet"),
        t.nrule("accept", purpose="accept diverted packet"),
    )
    tproxy: list[str] = []
    for f in fams:
        not_lo = t.addr(f, "daddr", t.LOOPBACK[f], negate=True)
        tproxy.append(
            t.nrule(
                not_lo,
                "meta l4proto tcp",
                f"tproxy {t.ADDR[f]} to :{inp.inbound}",
                f"meta mark set {mark}",
                "accept",
                purpose="tproxy to inbound proxy",
            )
        )
    # iptables' TPROXY drops a packet no transparent socket takes; nft's tproxy just does not match
    tproxy.extend(
        t.nrule(t.addr(f, "daddr", t.LOOPBACK[f], negate=True), "drop", purpose="no transparent listener") for f in fams
    )
    prert = (
        *(t.nrule(t.iif(name), "return", purpose="skip excluded interface") for name in inp.exclude_ifs),
        t.nrule(f"jump {SC_TP_INBOUND}", purpose="sidecar tproxy inbound"),
        t.nrule(t.mark_eq(TPROXY_MARK), "ct mark set meta mark", purpose="save tproxy mark on connection"),
    )
    inbound = [t.nrule(t.mark_eq(TPROXY_MARK), "return", purpose="skip tproxy-marked packet")]
    inbound.extend(
        t.nrule(t.iif("lo"), t.addr(f, "saddr", t.PASSTHROUGH_SOURCE[f]), "return", purpose="skip inbound passthrough")
        for f in fams
    )
    inbound.append(
        t.nrule(
            t.iif("lo"),
            t.mark_eq(TPROXY_OUTBOUND_MARK, negate=True),
            "return",
            purpose="skip lo traffic not from proxy",
        )
    )
    inbound.extend(_kubevirt(inp, redirect=False))
    inbound.append(t.nrule(t.dport("tcp", HBONE_PORT), "return", purpose="skip hbone port"))
    established = "ct state established,related"
    if inp.include_in is None:
        inbound.extend(
            t.nrule(t.dport("tcp", port), "return", purpose="skip excluded inbound port")
            for port in inp.exclude_in
            if port != HBONE_PORT
        )
        inbound.append(t.nrule(established, f"jump {SC_DIVERT}", purpose="divert established inbound"))
        inbound.append(t.nrule(f"jump {SC_TPROXY}", purpose="tproxy new inbound"))
    else:
        for port in inp.include_in:
            if port == HBONE_PORT:
                continue
            inbound.append(
                t.nrule(
                    t.dport("tcp", port), established, f"jump {SC_DIVERT}", purpose="divert established included port"
                )
            )
            inbound.append(t.nrule(t.dport("tcp", port), f"jump {SC_TPROXY}", purpose="tproxy new included port"))
    output = [t.nrule(t.oif(name), "return", purpose="skip excluded interface") for name in inp.exclude_ifs]
    output.append(t.nrule(t.oif("lo"), t.mark_eq(TPROXY_MARK), "return", purpose="skip tproxy-marked over lo"))
    for kind, ident in (("uid", inp.uid), ("gid", inp.gid)):
        output.extend(
            t.nrule(
                t.oif("lo"),
                t.addr(f, "daddr", t.LOOPBACK[f], negate=True),
                t.dport("tcp", HBONE_PORT, negate=True),
                t.owner(kind, ident),
                f"meta mark set {t.hex32(TPROXY_OUTBOUND_MARK)}",
                purpose=f"mark proxy {kind} to own pod ip",
            )
            for f in fams
        )
    output.append(
        t.nrule(t.mark_eq(TPROXY_MARK, kind="ct mark"), "meta mark set ct mark", purpose="restore tproxy mark")
    )
    return (
        t.Chain(SC_PRERT, None, prert),
        t.Chain(SC_TP_INBOUND, None, tuple(inbound)),
        t.Chain(SC_DIVERT, None, divert),
        t.Chain(SC_TPROXY, None, tuple(tproxy)),
        t.Chain(SC_TP_OUTPUT, None, tuple(output)),
    )
