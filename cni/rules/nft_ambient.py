"""Ambient in-pod interception as nftables chains (the same behaviour as the iptables rules in `ambient`). Pure.

Base chains `mangle_prerouting` (filter, priority mangle) → `am_mangle_prert` and `mangle_output` (route,
priority mangle) → `am_mangle_output` carry the mark/connmark scheme; `nat_prerouting` (dstnat) →
`am_prert` and `nat_output` (-100) → `am_output` the redirects. The proxy's sockets carry the mark (never
redirected, so its connections to the pod's own address on 15008 never reach 15006 either); inbound
15008 (HBONE) is never captured.
"""

from __future__ import annotations

from cni.rules import nft_text as t
from cni.rules.ambient import CONNMARK_PROXY, DNS_PORT
from cni.rules.rule_text import check_networks, check_port, check_ports, check_u32

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from cni.contract.kinds import Family
    from cni.contract.spec import AmbientSpec

AM_MANGLE_PRERT = "am_mangle_prert"
AM_MANGLE_OUTPUT = "am_mangle_output"
AM_PRERT = "am_prert"
AM_OUTPUT = "am_output"


def ambient_chains(spec: AmbientSpec, families: tuple[Family, ...]) -> tuple[t.Chain, ...]:
    """The pod table's chains for an ambient pod, in listing order."""
    import ipaddress

    outbound = check_port(spec.outbound_port, "outbound proxy port")
    inbound = check_port(spec.inbound_port, "inbound proxy port")
    hbone = check_port(spec.hbone_port, "HBONE port")
    dns = check_port(spec.dns_port, "DNS proxy port")
    mark = check_u32(spec.mark, "proxy mark")
    mask = check_u32(spec.mark_mask, "proxy mark mask")
    if mask == 0 or mark & ~mask:
        raise ValueError(f"proxy mark {mark:#x} does not fit its mask {mask:#x}")
    probes: dict[Family, str] = {}
    for f in families:
        probe = spec.probe_snat_v4 if f == 4 else spec.probe_snat_v6
        if not isinstance(probe, ipaddress.IPv4Address | ipaddress.IPv6Address) or probe.version != f:
            raise ValueError(f"probe source for IPv{f} must be an IPv{f} address, not {probe!r}")
        probes[f] = str(probe)
    exclude_in = check_ports(spec.exclude_inbound_ports, "excluded inbound ports")
    exclude_out = check_ports(spec.exclude_outbound_ports, "excluded outbound ports")
    exclude_ranges = {f: check_networks(spec.exclude_outbound_ranges, f, "excluded outbound ranges") for f in families}
    connmark = CONNMARK_PROXY & mask
    guard = t.family_guard(families)
    not_marked = t.mark_eq(mark, mask, negate=True)

    pre = [
        t.nrule(t.addr(f, "saddr", probes[f]), "meta l4proto tcp", "accept", purpose="accept kubelet probe")
        for f in families
    ]
    pre.extend(t.nrule(t.dport("tcp", port), "return", purpose="skip excluded inbound port") for port in exclude_in)
    pre.extend(
        t.nrule(
            t.addr(f, "daddr", t.LOOPBACK[f], negate=True),
            t.dport("tcp", hbone, negate=True),
            not_marked,
            t.redirect_to(inbound),
            purpose="ambient inbound redirect",
        )
        for f in families
    )
    out = [
        t.nrule(t.addr(f, "daddr", probes[f]), "meta l4proto tcp", "accept", purpose="accept kubelet probe reply")
        for f in families
    ]
    if spec.capture_dns:
        out.extend(
            t.nrule(
                t.oif("lo", negate=True),
                t.dport(proto, DNS_PORT),
                not_marked,
                t.redirect_to(dns),
                purpose=f"ambient {proto} dns redirect",
            )
            for proto in ("udp", "tcp")
        )
    out.append(
        t.nrule(
            "meta l4proto tcp",
            t.mark_eq(connmark, mask, kind="ct mark"),
            "accept",
            purpose="accept proxy connection reply",
        )
    )
    out.extend(
        t.nrule(
            t.addr(f, "daddr", t.LOOPBACK[f], negate=True),
            t.oif("lo"),
            "accept",
            purpose="accept pod-local traffic over lo",
        )
        for f in families
    )
    out.extend(t.nrule(t.dport("tcp", port), "return", purpose="skip excluded outbound port") for port in exclude_out)
    for f in families:
        out.extend(
            t.nrule(t.addr(f, "daddr", net), "return", purpose="skip excluded outbound range")
            for net in exclude_ranges[f]
        )
    out.extend(
        t.nrule(
            t.addr(f, "daddr", t.LOOPBACK[f], negate=True),
            "meta l4proto tcp",
            not_marked,
            t.redirect_to(outbound),
            purpose="ambient outbound redirect",
        )
        for f in families
    )
    return (
        t.base_chain("mangle_prerouting", "filter", "prerouting", t.PRIO_MANGLE, AM_MANGLE_PRERT, guard,
                     purpose="ambient prerouting"),
        t.base_chain("mangle_output", "route", "output", t.PRIO_MANGLE, AM_MANGLE_OUTPUT, guard,
                     purpose="ambient output"),
        t.base_chain("nat_prerouting", "nat", "prerouting", t.PRIO_DSTNAT, AM_PRERT, guard,
                     purpose="ambient prerouting"),
        t.base_chain("nat_output", "nat", "output", t.PRIO_NAT_OUTPUT, AM_OUTPUT, guard, purpose="ambient output"),
        t.Chain(
            AM_MANGLE_PRERT,
            None,
            (
                # packets of the proxy's own connections (to the local app over lo) tag their conntrack entry…
                t.nrule(t.mark_eq(mark, mask), t.set_masked("ct mark", connmark, mask), purpose="tag proxy connection"),
            ),
        ),
        t.Chain(
            AM_MANGLE_OUTPUT,
            None,
            (
                # …and the app's replies on those connections get the tag as packet mark (never captured)
                t.nrule(
                    t.mark_eq(connmark, mask, kind="ct mark"),
                    "meta mark set ct mark",
                    purpose="restore proxy connection mark",
                ),
            ),
        ),
        t.Chain(AM_PRERT, None, tuple(pre)),
        t.Chain(AM_OUTPUT, None, tuple(out)),
    )
