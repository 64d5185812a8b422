"""TC ingress and egress (clsact) inside a pod's netns, never in the host netns: our filters' names and
places, their removal and status with pyroute2 (the attach is tc_attach.py), the pod netns' cookie.

Netlink work runs in a thread that has setns()'d into the pod netns (setns affects only the calling thread;
pyroute2 binds its socket to the thread's netns). A clsact qdisc is created only where none exists and
never deleted; only our filters (priority HR_PRIO, handle 1, named hr_tc_ingress on ingress and
hr_tc_egress on egress) are touched.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from cni.kernel.netns import run_in_thread
from node_agent.kernel.netns_runner import run_in_netns

HR_PRIO = 0x4852  # "HR"
HR_HANDLE = 1
INGRESS_PARENT = 0xFFFFFFF2
EGRESS_PARENT = 0xFFFFFFF3
FILTER_NAME = "hr_tc_ingress"
EGRESS_FILTER_NAME = "hr_tc_egress"
INGRESS = "ingress"
EGRESS = "egress"
_HOOKS = {INGRESS: (INGRESS_PARENT, FILTER_NAME), EGRESS: (EGRESS_PARENT, EGRESS_FILTER_NAME)}
FILTER_NAMES = {hook: name for hook, (_parent, name) in _HOOKS.items()}
HOOK_PARENTS = {INGRESS: INGRESS_PARENT, EGRESS: EGRESS_PARENT}


class TcError(Exception):
    pass


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


def _our_filters(ipr: Any, index: int, hook: str = INGRESS) -> list[Any]:
    parent, fname = _HOOKS[hook]
    out = []
    try:
        filters = ipr.get_filters(index=index, parent=parent)
    except Exception:  # no clsact qdisc: no filters
        return []
    for f in filters:
        if _attr(f, "TCA_KIND") != "bpf":
            continue
        opts = _attr(f, "TCA_OPTIONS")
        name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
        if name and str(name).startswith(fname):
            out.append(f)
    return out


def _pod_links(ipr: Any) -> list[tuple[int, str]]:
    return [
        (int(link["index"]), str(_attr(link, "IFLA_IFNAME")))
        for link in ipr.get_links()
        if _attr(link, "IFLA_IFNAME") != "lo"
    ]


def detach_ingress(netns_path: str, hook: str = INGRESS) -> list[str]:
    """Delete only our filters (of that hook); the qdisc and other filters stay. A gone netns is fine."""
    if not os.path.exists(netns_path):
        return []
    parent = _HOOKS[hook][0]

    def work() -> list[str]:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        removed: list[str] = []
        with IPRoute() as ipr:
            for index, ifname in _pod_links(ipr):
                for _ in _our_filters(ipr, index, hook):
                    try:
                        ipr.tc("del-filter", "bpf", index, HR_HANDLE, parent=parent, prio=HR_PRIO)
                    except NetlinkError as e:
                        if e.code != 2:  # ENOENT: already gone
                            raise TcError(f"deleting our TC filter on {ifname}: {e}") from e
                    removed.append(ifname)
                    break
        return removed

    return run_in_thread(netns_path, work, name="headrace-tc-netns")


def detach_quietly(netns_path: str) -> None:
    """Rollback: our filters off both hooks; a failure is only logged."""
    try:
        for hook in (INGRESS, EGRESS):
            detach_ingress(netns_path, hook)
    except (TcError, OSError):
        logging.getLogger("headrace.backend.ebpf").warning("ebpf tc rollback failed", extra={"netns": netns_path})


def ingress_status(netns_path: str, hook: str = INGRESS) -> dict[str, bool]:
    """{interface: our filter (of that hook) present} for every non-loopback interface of the netns."""
    if not os.path.exists(netns_path):
        return {}

    def work() -> dict[str, bool]:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            return {ifname: bool(_our_filters(ipr, index, hook)) for index, ifname in _pod_links(ipr)}

    return run_in_thread(netns_path, work, name="headrace-tc-netns")


SO_NETNS_COOKIE = 71  # Linux >= 5.14


def netns_cookie(netns_path: str) -> int:
    """The netns' cookie (what bpf_get_netns_cookie answers for sockets there), from a socket made in it
    (on the agent's pooled netns threads)."""
    return run_in_netns(netns_path, netns_cookie_here, timeout=10.0)


def netns_cookie_here() -> int:
    """`netns_cookie` of the calling thread's netns."""
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        except OSError as e:
            raise TcError(f"SO_NETNS_COOKIE: {e} (needs Linux >= 5.14)") from e
    value: int = struct.unpack("=Q", raw)[0]
    return value
