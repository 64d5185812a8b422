"""Which TC filters are on a pod's interfaces, read with raw netlink dumps (RTM_GETLINK, RTM_GETTFILTER)
and a tcx query per interface and hook from one thread inside the pod netns: ours, and the foreign ones
that run before ours (`tc_foreign`).

The check runs for every pod at every agent start (adoption) and drift pass, so it avoids pyroute2's
message objects (~13 ms a hook there, ~1 ms for both hooks here). Parsing is pure (`links_of`,
`filters_of`); `status` does the I/O.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cni.netlink import netlink_parse
from cni.netlink.netlink_parse import NLMSG_DONE, NLMSG_ERROR
from node_agent.backends.ebpf import bpfsys, pinning, tc, tc_foreign
from node_agent.kernel.netns_runner import run_in_netns

RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWTFILTER, RTM_GETTFILTER = 44, 46
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFLA_IFNAME = 3
TCA_KIND, TCA_OPTIONS, TCA_CHAIN = 1, 2, 11
TCA_BPF_CLASSID, TCA_BPF_NAME, TCA_BPF_ID = 3, 7, 11
IFINFOMSG = struct.Struct("=BxHiII")
TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info


class TcStatusError(OSError):
    """The netlink dump failed."""


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def links_of(data: Iterable[tuple[int, bytes]]) -> list[tuple[int, str]]:
    """Pure: (index, name) of each RTM_NEWLINK payload, loopback excluded."""
    out: list[tuple[int, str]] = []
    for msg_type, payload in data:
        if msg_type != RTM_NEWLINK or len(payload) < IFINFOMSG.size:
            continue
        index = IFINFOMSG.unpack_from(payload)[2]
        name = next((_cstr(v) for t, v in netlink_parse.attributes(payload[IFINFOMSG.size :]) if t == IFLA_IFNAME), "")
        if name and name != "lo":
            out.append((index, name))
    return out


def records_of(data: Iterable[tuple[int, bytes]], parent: int) -> list[tc_foreign.TcFilter]:
    """Pure: every filter (any kind) under parent in RTM_NEWTFILTER payloads."""
    out: list[tc_foreign.TcFilter] = []
    for msg_type, payload in data:
        if msg_type != RTM_NEWTFILTER or len(payload) < TCMSG.size:
            continue
        _family, _index, handle, fparent, info = TCMSG.unpack_from(payload)
        if fparent != parent:
            continue
        kind, name, prog_id, chain, classid = "", "", 0, 0, 0
        for t, v in netlink_parse.attributes(payload[TCMSG.size :]):
            if t == TCA_KIND:
                kind = _cstr(v)
            elif t == TCA_CHAIN and len(v) >= 4:
                chain = struct.unpack_from("=I", v)[0]
            elif t == TCA_OPTIONS:
                for ot, ov in netlink_parse.attributes(v):
                    if ot == TCA_BPF_NAME:
                        name = _cstr(ov)
                    elif ot == TCA_BPF_ID and len(ov) >= 4:
                        prog_id = struct.unpack_from("=I", ov)[0]
                    elif ot == TCA_BPF_CLASSID and len(ov) >= 4:
                        classid = struct.unpack_from("=I", ov)[0]
        out.append(tc_foreign.TcFilter(kind, info >> 16, handle, chain, name, prog_id, classid))
    return out


def filters_of(data: Iterable[tuple[int, bytes]], parent: int) -> list[tuple[str, int]]:
    """Pure: (program name, program id) of each bpf filter under parent in RTM_NEWTFILTER payloads."""
    return [(f.name, f.prog_id) for f in records_of(data, parent) if f.kind == "bpf"]


@dataclass
class HookView:
    """One hook of one interface: its clsact filters and its tcx programs ((program id, link id))."""

    index: int
    filters: list[tc_foreign.TcFilter] = field(default_factory=list)
    tcx: list[tuple[int, int]] = field(default_factory=list)


def dump(sock: socket.socket, msg_type: int, body: bytes, seq: int) -> list[tuple[int, bytes]]:
    hdr = netlink_parse.NLMSGHDR.pack(netlink_parse.NLMSGHDR.size + len(body), msg_type,
                                      NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    sock.send(hdr + body)
    got: list[tuple[int, bytes]] = []
    while True:
        data = sock.recv(1 << 16)
        for t, s, payload in netlink_parse.messages(data):
            if s != seq:
                continue
            if t == NLMSG_DONE:
                return got
            if t == NLMSG_ERROR:
                err = netlink_parse.error_code(payload)
                if err == 0:
                    return got
                raise TcStatusError(err, os.strerror(err))
            got.append((t, payload))


def links_here(sock: socket.socket) -> list[tuple[int, str]]:
    """(index, name) of every non-loopback interface of the netns `sock` was made in (one RTM_GETLINK dump,
    sequence number 1)."""
    return links_of(dump(sock, RTM_GETLINK, IFINFOMSG.pack(0, 0, 0, 0, 0), 1))


TCX_TYPES = {tc.INGRESS: bpfsys.ATTACH_TCX_INGRESS, tc.EGRESS: bpfsys.ATTACH_TCX_EGRESS}


def tcx_programs(index: int, hook: str) -> list[tuple[int, int]]:
    """The tcx programs ((program id, link id)) on an interface of the calling thread's netns at a hook."""
    try:
        return bpfsys.tcx_query(index, TCX_TYPES[hook])
    except bpfsys.BpfSysError:  # a kernel without tcx (< 6.6): nothing can run there
        return []


def read(netns_path: str, hooks: Iterable[str]) -> dict[str, dict[str, HookView]]:
    """{hook: {interface: HookView}} for every non-loopback interface of the netns. A gone netns gives {}."""
    if not os.path.exists(netns_path):
        return {}
    hooks = tuple(hooks)

    def work() -> dict[str, dict[str, HookView]]:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as s:
            s.settimeout(5)
            links = links_here(s)
            out: dict[str, dict[str, HookView]] = {hook: {} for hook in hooks}
            seq = 2
            for index, ifname in links:
                for hook in hooks:
                    parent = tc.HOOK_PARENTS[hook]
                    view = HookView(index, tcx=tcx_programs(index, hook))
                    try:
                        view.filters = records_of(dump(s, RTM_GETTFILTER, TCMSG.pack(0, index, 0, parent, 0), seq),
                                                  parent)
                    except TcStatusError:  # no clsact qdisc on the interface: no filters
                        pass
                    seq += 1
                    out[hook][ifname] = view
            return out

    return run_in_netns(netns_path, work)


def problems(pdir: Path, netns: str, hooks: Iterable[tuple[str, str]], classid: int) -> list[str]:
    """Our TC programs (hooks: (program name, hook)) pinned in pdir and on their hook of every pod
    interface, as the pinned program, in filters of that classid (the pod's TC slot; 0: the pod's own
    programs, which do not read it) (one netlink pass for all)."""
    hooks = tuple(hooks)
    found_problems: list[str] = []
    pinned: dict[str, int] = {}
    for prog_name, _hook in hooks:
        fd = pinning.open_pinned(pdir / prog_name)
        if fd is None:
            found_problems.append(f"eBPF program {prog_name} is not pinned")
            continue
        try:
            pinned[prog_name] = bpfsys.prog_info(fd).prog_id
        finally:
            os.close(fd)
    try:
        views = read(netns, (hook for _name, hook in hooks))
    except OSError as e:
        return [*found_problems, f"cannot read the TC filters in {netns}: {e}"]
    if not any(views.values()):
        return [*found_problems, f"no pod interface found in {netns}"]
    for prog_name, hook in hooks:
        for ifname, view in views[hook].items():
            filters = [f for f in view.filters if tc_foreign.is_ours(f, prog_name)]
            ours = {f.prog_id for f in filters}
            if not ours:
                found_problems.append(f"TC {hook} program missing on {ifname}")
            elif prog_name in pinned and pinned[prog_name] not in ours:
                found_problems.append(f"TC {hook} program on {ifname} is not the pinned one")
            found_problems += [f"TC {hook} filter on {ifname} has classid {f.classid:#x}, not the pod's {classid:#x}"
                               for f in filters if classid and f.classid != classid]
            found_problems += tc_foreign.describe(hook, ifname, view.filters, view.tcx, prog_name)
    return found_problems
