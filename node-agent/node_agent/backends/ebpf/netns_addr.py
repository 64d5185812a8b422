"""Addresses the sidecar needs inside its pod netns, as the iptables backend (istio-iptables) provides them.

IPv6 has no 127.0.0.0/8: the sidecar binds its inbound passthrough source ::6, which must exist on lo. The
address stays on removal (harmless, it dies with the pod netns), as with the iptables backend.
"""

from __future__ import annotations

from cni.kernel.netns import run_in_thread
from node_agent.backends.ebpf.tc import TcError

PASSTHROUGH_V6 = "::6"


def ensure_lo_passthrough6(netns_path: str) -> None:
    """Put ::6/128 on the netns' lo (idempotent: replace)."""

    def work() -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname="lo")
            if not found:
                raise TcError(f"no lo in {netns_path}")
            try:
                ipr.addr("replace", index=found[0], address=PASSTHROUGH_V6, prefixlen=128)
            except NetlinkError as e:
                raise TcError(f"adding {PASSTHROUGH_V6}/128 to lo in {netns_path}: {e}") from e

    run_in_thread(netns_path, work, name="headrace-tc-netns")
