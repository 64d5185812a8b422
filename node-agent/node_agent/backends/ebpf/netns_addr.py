"""Addresses the sidecar needs inside its pod netns, as the iptables backend (istio-iptables) provides them.

IPv6 has no 127.0.0.0/8: the sidecar binds its inbound passthrough source ::6, which must exist on lo. The
address stays on removal (harmless, it dies with the pod netns), as with the iptables backend.
"""

from __future__ import annotations

from cni.kernel.loopback_address import passthrough_v6_here
from node_agent.kernel.netns_runner import run_in_netns


def ensure_lo_passthrough6(netns_path: str) -> None:
    """Put ::6/128 on the netns' lo (idempotent: replace): one rtnetlink request from a pooled thread
    inside the netns. OSError when the netns cannot be entered or the kernel refuses."""
    run_in_netns(netns_path, passthrough_v6_here, timeout=10.0)
