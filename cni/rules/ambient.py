"""Ambient in-pod interception rules (Istio's in-pod model for the node proxy, REDIRECT based). Pure.

Chains HEADRACE_AM_PRERT and HEADRACE_AM_OUTPUT, in both the mangle and the nat table. Rule text and
validation: `rule_text`.
"""

from __future__ import annotations

from cni.rules.rule_text import (
    LOOPBACK,
    RuleSet,
    TableRules,
    check_family,
    check_networks,
    check_port,
    check_ports,
    check_u32,
    dport_match,
    mark_match,
    rule,
    to_ports,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from cni.contract.kinds import Family
    from cni.contract.spec import AmbientSpec

AMBIENT_PREFIX = "HEADRACE_AM_"
AM_PRERT = "HEADRACE_AM_PRERT"
AM_OUTPUT = "HEADRACE_AM_OUTPUT"
# Conntrack mark put on connections the node proxy made to the local app (Istio uses the same value), so
# the app's reply packets carry it and are never captured.
CONNMARK_PROXY = 0x111
DNS_PORT = 53


def ambient_rules(spec: AmbientSpec, family: Family) -> RuleSet:
    """Istio in-pod (ztunnel) style interception for one family, REDIRECT based."""
    import ipaddress

    fam = check_family(family)
    outbound = check_port(spec.outbound_port, "outbound proxy port")
    inbound = check_port(spec.inbound_port, "inbound proxy port")
    hbone = check_port(spec.hbone_port, "HBONE port")
    dns = check_port(spec.dns_port, "DNS proxy port")
    mark = check_u32(spec.mark, "proxy mark")
    mask = check_u32(spec.mark_mask, "proxy mark mask")
    if mask == 0 or mark & ~mask:
        raise ValueError(f"proxy mark {mark:#x} does not fit its mask {mask:#x}")
    probe = spec.probe_snat_v4 if fam == 4 else spec.probe_snat_v6
    if not isinstance(probe, ipaddress.IPv4Address | ipaddress.IPv6Address) or probe.version != fam:
        raise ValueError(f"probe source for IPv{fam} must be an IPv{fam} address, not {probe!r}")
    probe_net = f"{probe}/{probe.max_prefixlen}"
    exclude_in = check_ports(spec.exclude_inbound_ports, "excluded inbound ports")
    exclude_out = check_ports(spec.exclude_outbound_ports, "excluded outbound ports")
    exclude_ranges = check_networks(spec.exclude_outbound_ranges, fam, "excluded outbound ranges")
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
                matches=[mark_match(mark, mask)],
                purpose="tag proxy connection",
                target="CONNMARK",
                target_args=f"--set-xmark {connmark:#x}/{mask:#x}",
            ),
            # …and the app's replies on those connections get the tag as packet mark (never captured).
            rule(
                AM_OUTPUT,
                matches=[mark_match(connmark, mask, kind="connmark")],
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
                matches=[dport_match("tcp", port)],
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
            matches=[dport_match("tcp", hbone, negate=True), mark_match(mark, mask, negate=True)],
            purpose="ambient inbound redirect",
            target="REDIRECT",
            target_args=to_ports(inbound),
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
                    matches=[dport_match(proto, DNS_PORT), mark_match(mark, mask, negate=True)],
                    purpose=f"ambient {proto} dns redirect",
                    target="REDIRECT",
                    target_args=to_ports(dns),
                )
            )
    out.append(
        rule(
            AM_OUTPUT,
            proto="tcp",
            matches=[mark_match(connmark, mask)],
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
                matches=[dport_match("tcp", port)],
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
            matches=[mark_match(mark, mask, negate=True)],
            purpose="ambient outbound redirect",
            target="REDIRECT",
            target_args=to_ports(outbound),
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
