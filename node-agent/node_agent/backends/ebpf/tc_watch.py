"""What announces a change to an eBPF pod's TC filters, for the drift shortcut (`intact_cache`).

Reading a pod's TC filters (`tc_status`: a link dump and a filter dump per interface and hook, from
inside the pod netns) is the costliest part of its drift read. Filter, qdisc and link changes are
announced by rtnetlink to the netns' listeners (RTNLGRP_TC, RTNLGRP_LINK): a socket subscribed to both
before the full read, with nothing queued on it since, means the filters are as that read found them.
tcx programs are attached with bpf(2), which announces nothing, so the shortcut still asks each
interface for them (a query per interface and hook, from inside the netns); a pod found intact has none.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from node_agent.backends.ebpf import tc, tc_status
from node_agent.kernel.fd_limit import moved_high
from node_agent.kernel.netns_runner import visiting

RTMGRP_LINK, RTMGRP_TC = 0x1, 0x8  # <linux/rtnetlink.h>: the groups' bits (RTNLGRP_LINK 1, RTNLGRP_TC 4)
HOOKS = (tc.INGRESS, tc.EGRESS)


@dataclass(frozen=True)
class TcWatch:
    sock: socket.socket  # subscribed in the pod netns
    netns: str
    interfaces: tuple[int, ...]  # the pod's non-loopback interfaces (ifindex) when it was subscribed

    def close(self) -> None:
        self.sock.close()

    def quiet(self, tcx: bool = True) -> bool:
        """Nothing announced since the subscription (an overrun counts as something), and no tcx program
        on any interface (tcx False: not asked; the node's change count, which counts tcx attaches, stood
        still)."""
        try:
            self.sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
            return False
        except BlockingIOError:
            pass
        except OSError:  # ENOBUFS: announcements were lost
            return False
        if not tcx:
            return True
        with visiting(self.netns):
            return not any(tc_status.tcx_programs(index, hook) for index in self.interfaces for hook in HOOKS)


def open_watch(netns: str) -> TcWatch:
    """Subscribe in the pod netns, then list its interfaces (a change after the subscription is announced).
    Raises OSError."""
    with visiting(netns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            sock.bind((0, RTMGRP_LINK | RTMGRP_TC))
            with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                               socket.NETLINK_ROUTE) as query:
                query.settimeout(5)
                links = tc_status.links_here(query)
        except OSError:
            sock.close()
            raise
    return TcWatch(moved_high(sock), netns, tuple(index for index, _name in links))
