"""Sidecar interception rules (Istio istio-iptables compatible), one address family at a time. Pure.

REDIRECT mode (nat): HEADRACE_SC_INBOUND, HEADRACE_SC_IN_REDIRECT, HEADRACE_SC_OUTPUT, HEADRACE_SC_REDIRECT.
TPROXY mode adds the inbound part in mangle (HEADRACE_SC_PRERT, HEADRACE_SC_INBOUND, HEADRACE_SC_DIVERT,
HEADRACE_SC_TPROXY, HEADRACE_SC_OUTPUT); the nat table then keeps only the outbound part (no nat
HEADRACE_SC_INBOUND, unless kubevirtInterfaces need it). Rule text and validation: `rule_text`; the
interface rules (excludeInterfaces, kubevirtInterfaces): `sidecar_interfaces`.

As istio-iptables: the proxy's HBONE port 15008 is never captured inbound (first rule of the inbound
chain), and the proxy's own connections to its pod's IP go to the inbound port except those to 15008.
"""

from __future__ import annotations

from cni.contract.constants import (
    INTERCEPTION_REDIRECT,
    INTERCEPTION_TPROXY,
    SIDECAR_EXCLUDED_INBOUND,
    SIDECAR_HBONE_PORT,
    TPROXY_MARK,
    TPROXY_OUTBOUND_MARK,
)
from cni.rules.rule_text import (
    ANY_ADDRESS,
    LOOPBACK,
    PASSTHROUGH_SOURCE,
    RuleSet,
    TableRules,
    check_family,
    check_id,
    check_networks,
    check_optional_networks,
    check_port,
    check_ports,
    dport_match,
    full_mark_match,
    owner_match,
    rule,
    to_ports,
)
from cni.rules.sidecar_interfaces import (
    check_interfaces,
    excluded_in_rules,
    excluded_out_rules,
    kubevirt_rules,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:  # no typing at run time: the CNI plugin imports this module
    from cni.contract.kinds import Family
    from cni.contract.sidecar_params import SidecarParams
    from cni.contract.spec import SidecarSpec

SIDECAR_PREFIX = "HEADRACE_SC_"
SC_INBOUND = "HEADRACE_SC_INBOUND"
SC_IN_REDIRECT = "HEADRACE_SC_IN_REDIRECT"
SC_OUTPUT = "HEADRACE_SC_OUTPUT"
SC_REDIRECT = "HEADRACE_SC_REDIRECT"
SC_PRERT = "HEADRACE_SC_PRERT"
SC_DIVERT = "HEADRACE_SC_DIVERT"
SC_TPROXY = "HEADRACE_SC_TPROXY"


#: rulesets built, by (spec, family): the agent builds the same few specs' rules for every pod it applies
#: or checks (0.1 ms a family); cleared when full. A RuleSet is immutable, so sharing one is safe.
_BUILT: dict[tuple[object, object], RuleSet] = {}
BUILT_MAX = 256


def sidecar_rules(spec: SidecarSpec | SidecarParams, family: Family) -> RuleSet:
    """Istio istio-iptables compatible interception for one family: inbound REDIRECT (nat) or, with
    ``interception_mode`` TPROXY, inbound TPROXY (mangle, see `_tproxy_mangle`); outbound REDIRECT.
    Raises ValueError for a spec it cannot build (nothing is remembered then)."""
    key = (spec, family)
    try:
        return _BUILT[key]
    except KeyError:
        pass
    except TypeError:  # a field that cannot be hashed (a list): built, not remembered
        return _sidecar_rules(spec, family)
    built = _sidecar_rules(spec, family)
    if len(_BUILT) >= BUILT_MAX:
        _BUILT.clear()
    _BUILT[key] = built
    return built


def _sidecar_rules(spec: SidecarSpec | SidecarParams, family: Family) -> RuleSet:
    fam = check_family(family)
    uid = check_id(spec.proxy_uid, "proxy uid")
    gid = check_id(spec.proxy_gid, "proxy gid")
    outbound = check_port(spec.outbound_port, "outbound proxy port")
    inbound = check_port(spec.inbound_port, "inbound proxy port")
    exclude_in = check_ports((*SIDECAR_EXCLUDED_INBOUND, *spec.exclude_inbound_ports), "excludeInboundPorts")
    include_in = (
        None if spec.include_inbound_ports is None else check_ports(spec.include_inbound_ports, "includeInboundPorts")
    )
    exclude_out = check_ports(spec.exclude_outbound_ports, "excludeOutboundPorts")
    exclude_ranges = check_networks(spec.exclude_outbound_ranges, fam, "excludeOutboundIPRanges")
    include_ranges = check_optional_networks(spec.include_outbound_ranges, fam, "includeOutboundIPRanges")
    include_out = check_ports(spec.include_outbound_ports, "includeOutboundPorts")
    exclude_ifs = check_interfaces(spec.exclude_interfaces, "excludeInterfaces")
    kubevirt_ifs = check_interfaces(spec.kubevirt_interfaces, "kubevirtInterfaces")
    hbone = SIDECAR_HBONE_PORT
    lo_addr = LOOPBACK[fam]
    tproxy = uses_tproxy(spec)

    rules: list[str] = [
        rule(
            SC_REDIRECT,
            proto="tcp",
            purpose="sidecar outbound redirect",
            target="REDIRECT",
            target_args=to_ports(outbound),
        ),
        rule(
            SC_IN_REDIRECT,
            proto="tcp",
            purpose="sidecar inbound redirect",
            target="REDIRECT",
            target_args=to_ports(inbound),
        ),
    ]
    jumps: list[str] = []

    # Inbound: kubevirt interfaces' traffic is outbound (to SC_REDIRECT); excluded interfaces return; then
    # everything but 15008 and the excluded ports, or only the included ones.
    capture_inbound = include_in is None or len(include_in) > 0
    rules += kubevirt_rules(SC_INBOUND, SC_REDIRECT, kubevirt_ifs, include_ranges)
    if not tproxy and capture_inbound:
        rules += excluded_in_rules(SC_INBOUND, exclude_ifs)
        rules.append(
            rule(
                SC_INBOUND,
                proto="tcp",
                matches=[dport_match("tcp", hbone)],
                purpose="skip hbone port",
                target="RETURN",
            )
        )
    if tproxy:
        pass  # inbound goes through mangle (below); nat keeps the outbound part only
    elif include_in is None:
        for port in (p for p in exclude_in if p != hbone):
            rules.append(
                rule(
                    SC_INBOUND,
                    proto="tcp",
                    matches=[dport_match("tcp", port)],
                    purpose="skip excluded inbound port",
                    target="RETURN",
                )
            )
        rules.append(rule(SC_INBOUND, proto="tcp", purpose="sidecar inbound capture", target=SC_IN_REDIRECT))
    else:
        for port in (p for p in include_in if p != hbone):
            rules.append(
                rule(
                    SC_INBOUND,
                    proto="tcp",
                    matches=[dport_match("tcp", port)],
                    purpose="sidecar included inbound port",
                    target=SC_IN_REDIRECT,
                )
            )
    nat_inbound = (capture_inbound and not tproxy) or bool(kubevirt_ifs)
    if nat_inbound:
        jumps.append(rule("PREROUTING", proto="tcp", purpose="sidecar inbound", target=SC_INBOUND))

    # Outbound.
    rules += excluded_out_rules(SC_OUTPUT, exclude_ifs)
    for port in exclude_out:
        rules.append(
            rule(
                SC_OUTPUT,
                proto="tcp",
                matches=[dport_match("tcp", port)],
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
        rules.append(_proxy_to_own_pod(kind, ident, lo_addr, hbone, f"proxy {kind} to own pod ip", SC_IN_REDIRECT))
        # The app talking to itself over lo is not captured.
        rules.append(
            rule(
                SC_OUTPUT,
                out_if="lo",
                matches=[owner_match(kind, ident, negate=True)],
                purpose=f"skip non-proxy {kind} over lo",
                target="RETURN",
            )
        )
        # The proxy's own outbound traffic goes straight out.
        rules.append(rule(SC_OUTPUT, matches=[owner_match(kind, ident)], purpose=f"skip proxy {kind}", target="RETURN"))
    rules.append(rule(SC_OUTPUT, dst=lo_addr, purpose="skip loopback destination", target="RETURN"))
    for net in exclude_ranges:
        rules.append(rule(SC_OUTPUT, dst=net, purpose="skip excluded outbound range", target="RETURN"))
    for port in include_out:
        rules.append(
            rule(
                SC_OUTPUT,
                proto="tcp",
                matches=[dport_match("tcp", port)],
                purpose="sidecar included outbound port",
                target=SC_REDIRECT,
            )
        )
    if include_ranges is None:
        rules.append(rule(SC_OUTPUT, purpose="sidecar outbound capture", target=SC_REDIRECT))
    else:
        for net in include_ranges:
            rules.append(rule(SC_OUTPUT, dst=net, purpose="sidecar included outbound range", target=SC_REDIRECT))
    jumps.append(rule("OUTPUT", proto="tcp", purpose="sidecar outbound", target=SC_OUTPUT))

    nat = TableRules(
        table="nat",
        chains=(SC_INBOUND, SC_IN_REDIRECT, SC_OUTPUT, SC_REDIRECT)
        if not tproxy or kubevirt_ifs
        else (SC_IN_REDIRECT, SC_OUTPUT, SC_REDIRECT),
        jumps=tuple(jumps),
        rules=tuple(rules),
    )
    if not tproxy:
        return RuleSet(family=fam, owner_prefix=SIDECAR_PREFIX, tables=(nat,))
    assert include_in is None or include_in  # uses_tproxy: some inbound capture
    mangle = _tproxy_mangle(fam, inbound, include_in, exclude_in, uid, gid, exclude_ifs, kubevirt_ifs)
    return RuleSet(family=fam, owner_prefix=SIDECAR_PREFIX, tables=(mangle, nat))


def _proxy_to_own_pod(kind: str, ident: int, lo_addr: str, hbone: int, purpose: str, target: str,
                      target_args: str = "") -> str:
    """The proxy (by uid or gid) connecting to its own pod's address over lo, except to HBONE: that is
    inbound traffic for the proxy, not outbound."""
    return rule(
        SC_OUTPUT,
        dst=lo_addr,
        not_dst=True,
        out_if="lo",
        proto="tcp",
        matches=[dport_match("tcp", hbone, negate=True), owner_match(kind, ident)],
        purpose=purpose,
        target=target,
        target_args=target_args,
    )


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
    fam: Family,
    inbound: int,
    include_in: tuple[int, ...] | None,
    exclude_in: tuple[int, ...],
    uid: int,
    gid: int,
    exclude_ifs: tuple[str, ...] = (),
    kubevirt_ifs: tuple[str, ...] = (),
) -> TableRules:
    """Inbound TPROXY interception (mangle), Istio's TPROXY mode in behaviour:

    - PREROUTING → PRERT → INBOUND: packets already marked TPROXY_MARK, the proxy's passthrough source on
      lo and other lo traffic not marked TPROXY_OUTBOUND_MARK are left alone; excluded ports return;
      packets of established connections are marked and accepted (DIVERT: the policy routing delivers them
      locally, to the proxy's socket); new connections are TPROXYed to the inbound port with the mark.
      15008 (HBONE) is never captured, traffic on excluded interfaces returns (PRERT) and so does
      traffic arriving on kubevirt interfaces (INBOUND: the nat rules send it to the outbound port).
      Back in PRERT, a packet arriving with TPROXY_MARK (the proxy's original_src connection to the app)
      saves its mark on the connection.
    - OUTPUT (mangle): the proxy's own TCP to a non-loopback address over lo (its pod IP) is marked
      TPROXY_OUTBOUND_MARK (so INBOUND captures it); packets of connections marked TPROXY_MARK get the
      mark back (the app's replies to original_src connections are routed to the proxy, not out).
    """
    lo_addr = LOOPBACK[fam]
    full = 0xFFFFFFFF
    hbone = SIDECAR_HBONE_PORT
    rules: list[str] = [
        *excluded_in_rules(SC_PRERT, exclude_ifs),
        *excluded_out_rules(SC_OUTPUT, exclude_ifs),
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
            matches=[full_mark_match(TPROXY_MARK)],
            purpose="save tproxy mark on connection",
            target="CONNMARK",
            target_args=f"--save-mark --nfmask {full:#x} --ctmask {full:#x}",
        ),
        rule(
            SC_INBOUND,
            proto="tcp",
            matches=[full_mark_match(TPROXY_MARK)],
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
            matches=[full_mark_match(TPROXY_OUTBOUND_MARK, negate=True)],
            purpose="skip lo traffic not from proxy",
            target="RETURN",
        ),
        *kubevirt_rules(SC_INBOUND, None, kubevirt_ifs, None),
        rule(SC_INBOUND, proto="tcp", matches=[dport_match("tcp", hbone)], purpose="skip hbone port", target="RETURN"),
    ]
    established = "-m conntrack --ctstate RELATED,ESTABLISHED"
    if include_in is None:
        for port in (p for p in exclude_in if p != hbone):
            rules.append(
                rule(
                    SC_INBOUND,
                    proto="tcp",
                    matches=[dport_match("tcp", port)],
                    purpose="skip excluded inbound port",
                    target="RETURN",
                )
            )
        rules.append(
            rule(SC_INBOUND, proto="tcp", matches=[established], purpose="divert established inbound", target=SC_DIVERT)
        )
        rules.append(rule(SC_INBOUND, proto="tcp", purpose="tproxy new inbound", target=SC_TPROXY))
    else:
        for port in (p for p in include_in if p != hbone):
            rules.append(
                rule(
                    SC_INBOUND,
                    proto="tcp",
                    matches=[dport_match("tcp", port), established],
                    purpose="divert established included port",
                    target=SC_DIVERT,
                )
            )
            rules.append(
                rule(
                    SC_INBOUND,
                    proto="tcp",
                    matches=[dport_match("tcp", port)],
                    purpose="tproxy new included port",
                    target=SC_TPROXY,
                )
            )
    rules.append(
        rule(
            SC_OUTPUT,
            out_if="lo",
            proto="tcp",
            matches=[full_mark_match(TPROXY_MARK)],
            purpose="skip tproxy-marked over lo",
            target="RETURN",
        )
    )
    for kind, ident in (("uid", uid), ("gid", gid)):
        rules.append(_proxy_to_own_pod(kind, ident, lo_addr, hbone, f"mark proxy {kind} to own pod ip", "MARK",
                                       f"--set-xmark {TPROXY_OUTBOUND_MARK:#x}/{full:#x}"))
    rules.append(
        rule(
            SC_OUTPUT,
            proto="tcp",
            matches=[full_mark_match(TPROXY_MARK, kind="connmark")],
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
