"""Put our TC programs on the pod's interfaces (and take them off) with raw rtnetlink requests, from one
entry into the pod netns.

Per non-loopback interface: a clsact qdisc where none is (RTM_NEWQDISC with NLM_F_EXCL: whoever's clsact is
there stays), then our filter on each hook replaced in place (RTM_NEWTFILTER, NLM_F_CREATE |
NLM_F_REPLACE): kind bpf, priority HR_PRIO, handle HR_HANDLE, protocol all, direct action, the program by fd
and named after it. The same filter `tc filter replace ... bpf da fd N name hr_tc_ingress` makes; pyroute2
took ~3 ms a hook for it here, this ~0.1 ms. `detach` deletes (RTM_DELTFILTER) only the filters at our
priority and handle that carry our name (tc_foreign.is_ours), on both hooks, as `tc_status.read` lists them.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct

from cni.netlink.nft_messages import attr, string
from node_agent.backends.ebpf import tc, tc_foreign, tc_status
from node_agent.backends.ebpf.tc_status import IFINFOMSG, RTM_GETLINK, TCMSG, dump, links_of
from node_agent.kernel.netns_runner import run_in_netns
from node_agent.kernel.policy_routes_write import ask, request

RTM_NEWQDISC, RTM_NEWTFILTER, RTM_DELTFILTER = 36, 44, 45
NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_REPLACE = 0x4, 0x200, 0x400, 0x100  # `request` adds REQUEST | ACK
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_CLASSID, TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS = 3, 6, 7, 8
TCA_BPF_FLAG_ACT_DIRECT = 1
TC_H_CLSACT = 0xFFFFFFF1
CLSACT_HANDLE = 0xFFFF0000
ETH_P_ALL_BE = socket.htons(0x0003)  # filter protocol "all", network order as tcm_info carries it


def clsact_request(index: int, seq: int) -> bytes:
    """Pure: create a clsact qdisc on the interface unless one is there (EEXIST then)."""
    body = TCMSG.pack(0, index, CLSACT_HANDLE, TC_H_CLSACT, 0) + string(TCA_KIND, "clsact")
    return request(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, seq, body)


def filter_request(index: int, hook: str, prog_fd: int, name: str, seq: int, classid: int) -> bytes:
    """Pure: our bpf filter on the hook (tc.INGRESS / tc.EGRESS) of the interface, made or replaced, with
    that classid (the pod's TC slot: pod_index.tc_slot)."""
    options = b"".join((
        attr(TCA_BPF_CLASSID, struct.pack("=I", classid)),
        attr(TCA_BPF_FD, struct.pack("=I", prog_fd)),
        string(TCA_BPF_NAME, name),
        attr(TCA_BPF_FLAGS, struct.pack("=I", TCA_BPF_FLAG_ACT_DIRECT)),
    ))  # fmt: skip
    info = (tc.HR_PRIO << 16) | ETH_P_ALL_BE
    body = TCMSG.pack(0, index, tc.HR_HANDLE, tc.HOOK_PARENTS[hook], info)
    body += string(TCA_KIND, "bpf") + attr(TCA_OPTIONS, options)
    return request(RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_REPLACE, seq, body)


def attach(netns_path: str, progs: dict[str, int], classid: int) -> list[str]:
    """Our filter with the program of each hook (tc.INGRESS / tc.EGRESS → program fd) and that classid on
    every non-loopback interface of the netns; the interfaces done. tc.TcError when the netns has no such
    interface or a request fails."""

    def work() -> list[str]:
        done: list[str] = []
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as s:
            s.settimeout(5)
            links = links_of(dump(s, RTM_GETLINK, IFINFOMSG.pack(0, 0, 0, 0, 0), 1))
            if not links:
                raise tc.TcError(f"no interface besides lo in {netns_path}")
            seq = 2
            for index, ifname in links:
                err = ask(s, clsact_request(index, seq), seq)
                if err not in (0, errno.EEXIST):  # EEXIST: keep whoever's clsact is there
                    raise tc.TcError(f"clsact on {ifname}: {os.strerror(err)}")
                for hook, prog_fd in progs.items():
                    seq += 1
                    err = ask(s, filter_request(index, hook, prog_fd, tc.FILTER_NAMES[hook], seq, classid), seq)
                    if err:
                        raise tc.TcError(f"TC {hook} filter on {ifname}: {os.strerror(err)} (needs CONFIG_NET_CLS_BPF)")
                seq += 1
                done.append(ifname)
        return done

    return run_in_netns(netns_path, work, timeout=10.0)


def delete_request(index: int, hook: str, seq: int) -> bytes:
    """Pure: delete our bpf filter (priority HR_PRIO, handle HR_HANDLE) on the hook of the interface."""
    info = (tc.HR_PRIO << 16) | ETH_P_ALL_BE
    body = TCMSG.pack(0, index, tc.HR_HANDLE, tc.HOOK_PARENTS[hook], info) + string(TCA_KIND, "bpf")
    return request(RTM_DELTFILTER, 0, seq, body)


def detach(netns_path: str) -> list[str]:
    """Our filters off both hooks of every interface of the netns (the qdisc and other filters stay); the
    interfaces they were on. A gone netns has none. tc.TcError when a delete fails."""
    if not os.path.exists(netns_path):
        return []

    def work() -> list[str]:
        views = tc_status.read(netns_path, tc.HOOK_PARENTS)  # right here: this thread is in the netns
        done: list[str] = []
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as s:
            s.settimeout(5)
            seq = 1
            for hook, per_interface in views.items():
                for ifname, view in per_interface.items():
                    if any(tc_foreign.is_ours(f, tc.FILTER_NAMES[hook]) for f in view.filters):
                        err = ask(s, delete_request(view.index, hook, seq), seq)
                        if err not in (0, errno.ENOENT):
                            raise tc.TcError(f"deleting our TC {hook} filter on {ifname}: {os.strerror(err)}")
                        seq += 1
                        done.append(ifname)
        return done

    return run_in_netns(netns_path, work, timeout=10.0)


def detach_quietly(netns_path: str) -> None:
    """Rollback: `detach`, a failure only logged."""
    try:
        detach(netns_path)
    except (tc.TcError, OSError):
        logging.getLogger("headrace.backend.ebpf").warning("ebpf tc rollback failed", extra={"netns": netns_path})
