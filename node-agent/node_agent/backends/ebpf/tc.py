"""TC ingress and egress (clsact) inside a pod's netns, never in the host netns: our filters' names and
places (their attach and removal: tc_attach.py; their status: tc_status.py), the pod netns' cookie.

Netlink work runs in a thread that has setns()'d into the pod netns (setns affects only the calling thread,
and a netlink socket belongs to the netns it was made in). A clsact qdisc is created only where none exists
and never deleted; only our filters (priority HR_PRIO, handle 1, named hr_tc_ingress on ingress and
hr_tc_egress on egress) are touched.
"""

from __future__ import annotations

HR_PRIO = 0x4852  # "HR"
HR_HANDLE = 1
INGRESS_PARENT = 0xFFFFFFF2
EGRESS_PARENT = 0xFFFFFFF3
INGRESS = "ingress"
EGRESS = "egress"
FILTER_NAMES = {INGRESS: "hr_tc_ingress", EGRESS: "hr_tc_egress"}
HOOK_PARENTS = {INGRESS: INGRESS_PARENT, EGRESS: EGRESS_PARENT}


class TcError(Exception):
    pass


SO_NETNS_COOKIE = 71  # Linux >= 5.14


def netns_cookie_here() -> int:
    """The cookie of the calling thread's netns (what bpf_get_netns_cookie answers for sockets there),
    from a socket made in it."""
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        except OSError as e:
            raise TcError(f"SO_NETNS_COOKIE: {e} (needs Linux >= 5.14)") from e
    value: int = struct.unpack("=Q", raw)[0]
    return value
