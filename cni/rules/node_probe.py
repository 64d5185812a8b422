"""Node-side rules: host-originated TCP to enrolled pod IPs is SNATed to the probe address. Pure.

One chain, HEADRACE_POSTROUTING (nat), in the netns the agent runs in (the host's, on a real node).
"""

from __future__ import annotations

from cni.rules.rule_text import RuleSet, TableRules, check_family, rule

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    import ipaddress
    from collections.abc import Iterable

    from cni.contract.kinds import Family

NODE_CHAIN = "HEADRACE_POSTROUTING"


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

    fam = check_family(family)
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
