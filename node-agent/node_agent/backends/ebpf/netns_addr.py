"""What an apply needs from inside the pod netns before it writes anything: the netns cookie, and the
addresses the sidecar needs there, as the iptables backend (istio-iptables) provides them.

IPv6 has no 127.0.0.0/8: the sidecar binds its inbound passthrough source ::6, which must exist on lo. The
address stays on removal (harmless, it dies with the pod netns), as with the iptables backend.
"""

from __future__ import annotations

from cni.kernel.loopback_address import passthrough_v6_here
from node_agent.backends.ebpf.tc import netns_cookie_here
from node_agent.kernel.netns_runner import run_in_netns


def cookie_and_passthrough6(netns_path: str, passthrough6: bool) -> int:
    """One entry into the pod netns (none from a thread staying there, else a pooled thread): its cookie
    (tc.netns_cookie_here) and, when asked, ::6/128 put on its lo (idempotent: replace; one rtnetlink
    request). OSError (tc.TcError included) when the netns cannot be entered or the kernel refuses."""

    def work() -> int:
        if passthrough6:
            passthrough_v6_here()
        return netns_cookie_here()

    return run_in_netns(netns_path, work, timeout=10.0)
