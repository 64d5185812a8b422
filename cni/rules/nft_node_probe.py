"""Node-side probe SNAT as nftables (the same behaviour as `node_probe`'s HEADRACE_POSTROUTING). Pure.

`table inet headrace_node` in the netns the agent runs in: one base chain `postrouting` (nat, priority
srcnat) with one rule per enrolled pod IP. `meta skuid >= 0` matches only packets that have a local socket
(what iptables' `-m owner --socket-exists` matches): host-originated connections such as the kubelet's
probes, not forwarded traffic.
"""

from __future__ import annotations

from cni.rules import nft_text as t
from cni.rules.node_probe import parse_pod_ips

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Iterable


def node_probe_table(pod_ips: Iterable[object]) -> t.NftTable | None:
    """The node table for these pod IPs (both families in one table); None when there are none."""
    from cni.contract.spec import PROBE_SNAT_V4, PROBE_SNAT_V6

    ips = parse_pod_ips(pod_ips)
    if not ips:
        return None
    rules = tuple(
        t.nrule(
            t.addr(4 if ip.version == 4 else 6, "daddr", str(ip)),
            "meta l4proto tcp",
            "meta skuid >= 0",
            f"snat {t.ADDR[ip.version]} to {PROBE_SNAT_V4 if ip.version == 4 else PROBE_SNAT_V6}",
            purpose="snat kubelet probe",
        )
        for ip in ips
    )
    return t.NftTable(t.NODE_TABLE, (t.Chain("postrouting", t.hook("nat", "postrouting", t.PRIO_SRCNAT), rules),))
