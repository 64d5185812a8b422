"""Foreign TC programs that run before ours on a pod interface's hook: a bypass of the inbound capture.

At a clsact hook the kernel first runs the interface's tcx programs (Linux >= 6.6), then the clsact
filters of chain 0 in ascending priority ("pref"). A tcx program that passes the packet, or a filter at a
lower priority than ours (or at ours under another handle) whose action is final (`pass`/`ok`, `drop`, a
direct-action program returning TC_ACT_OK or TC_ACT_SHOT), ends the classification before our program
rewrites the port: inbound connections reach the app past the proxy. Filters after ours never run (our
program always returns a final verdict). Every such program or filter is drift; the repair removes it and
logs what it was, as with foreign programs on the pod cgroup (the pod interface is the pod's; nothing else
of the node is touched).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from dataclasses import dataclass

from cni.netlink import netlink_parse
from node_agent.backends.ebpf import bpfsys, tc
from node_agent.kernel.netns_runner import run_in_netns

log = logging.getLogger("headrace.backend.ebpf")

RTM_DELTFILTER = 45
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
TCA_KIND = 1
TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info (prio << 16 | protocol)


@dataclass(frozen=True)
class TcFilter:
    """One clsact filter record of a netlink dump."""

    kind: str
    prio: int
    handle: int
    chain: int = 0
    name: str = ""
    prog_id: int = 0
    classid: int = 0


@dataclass(frozen=True)
class Foreign:
    """A foreign filter (or tcx program: kind "tcx", prog_id, handle = link id) ahead of ours on a hook."""

    hook: str
    ifname: str
    index: int
    item: TcFilter


def is_ours(f: TcFilter, prefix: str) -> bool:
    return f.kind == "bpf" and f.prio == tc.HR_PRIO and f.handle == tc.HR_HANDLE and f.name.startswith(prefix)


def ahead_of_ours(filters: list[TcFilter], prefix: str) -> list[TcFilter]:
    """Pure: the filters of chain 0 that run before ours: a lower priority, or ours under another handle
    (an empty priority's header record, handle 0, classifies nothing by itself but is removed with it)."""
    out: list[TcFilter] = []
    for f in filters:
        if f.chain != 0 or is_ours(f, prefix):
            continue
        if f.prio < tc.HR_PRIO or (f.prio == tc.HR_PRIO and f.handle != 0):
            out.append(f)
    return out


def label(f: TcFilter) -> str:
    if f.kind == "tcx":
        return f"tcx program id {f.prog_id}" + (f" (link id {f.handle})" if f.handle else "")
    what = f"{f.kind} filter pref {f.prio} handle {f.handle:#x}"
    return what + (f" program {f.name or '?'} id {f.prog_id}" if f.kind == "bpf" else "")


def foreign_of(hook: str, ifname: str, index: int, filters: list[TcFilter], tcx: list[tuple[int, int]],
               prefix: str) -> list[Foreign]:
    """Pure: everything that runs before our filter on one hook of one interface."""
    items = [TcFilter("tcx", 0, link_id, prog_id=pid) for pid, link_id in tcx]
    items += ahead_of_ours(filters, prefix)
    return [Foreign(hook, ifname, index, f) for f in items]


def describe(hook: str, ifname: str, filters: list[TcFilter], tcx: list[tuple[int, int]], prefix: str) -> list[str]:
    return [f"foreign TC {label(x.item)} on {ifname} {hook} runs before ours"
            for x in foreign_of(hook, ifname, 0, filters, tcx, prefix)]


def _delete_filter(sock: socket.socket, x: Foreign, seq: int) -> None:
    """RTM_DELTFILTER: the whole priority when it is not ours (never priority 0: that flushes the hook),
    else the one handle."""
    f = x.item
    if f.prio <= 0:
        return
    whole = f.prio != tc.HR_PRIO
    body = TCMSG.pack(0, x.index, 0 if whole else f.handle, tc.HOOK_PARENTS[x.hook], f.prio << 16)
    if not whole:
        kind = f.kind.encode() + b"\0"
        nla = netlink_parse.NLATTR.pack(4 + len(kind), TCA_KIND) + kind
        body += nla + b"\0" * (-len(nla) % 4)
    hdr = netlink_parse.NLMSGHDR.pack(netlink_parse.NLMSGHDR.size + len(body), RTM_DELTFILTER,
                                      NLM_F_REQUEST | NLM_F_ACK, seq, 0)
    sock.send(hdr + body)
    while True:
        for t, s, payload in netlink_parse.messages(sock.recv(1 << 16)):
            if s == seq and t == netlink_parse.NLMSG_ERROR:
                err = netlink_parse.error_code(payload)
                if err and err not in (errno.ENOENT, errno.EINVAL):
                    raise OSError(err, f"deleting {label(f)} on {x.ifname}: {os.strerror(err)}")
                return


def remove(netns_path: str, found: list[Foreign], pod: str) -> int:
    """Remove them from the pod netns (gone meanwhile: nothing to do) and log each; how many there were."""
    if not found:
        return 0

    def work() -> None:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as s:
            s.settimeout(5)
            for seq, x in enumerate(found, start=1):
                if x.item.kind == "tcx":
                    atype = bpfsys.ATTACH_TCX_INGRESS if x.hook == tc.INGRESS else bpfsys.ATTACH_TCX_EGRESS
                    try:
                        bpfsys.tcx_detach(x.index, atype, x.item.prog_id, x.item.handle)
                    except bpfsys.BpfSysError as e:
                        if e.errno not in (errno.ENOENT, errno.EINVAL):
                            raise
                else:
                    _delete_filter(s, x, seq)
                log.warning("foreign TC %s on %s %s removed (it ran before ours)", label(x.item), x.ifname, x.hook,
                            extra={"pod": pod, "netns": netns_path, "step": "ebpf-foreign-tc"})

    run_in_netns(netns_path, work)
    return len(found)
