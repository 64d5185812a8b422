"""Which of our TC filters are on a pod's interfaces, read with two raw netlink dumps per interface
(RTM_GETLINK, RTM_GETTFILTER) from one thread inside the pod netns.

The check runs for every pod at every agent start (adoption) and drift pass, so it avoids pyroute2's
message objects (~13 ms a hook there, ~1 ms for both hooks here). Parsing is pure (`links_of`,
`filters_of`); `status` does the I/O.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable
from pathlib import Path

from cni.kernel.netns import run_in_thread
from node_agent.backends.ebpf import bpfsys, pinning, tc
from node_agent.kernel import netlink_parse
from node_agent.kernel.netlink_parse import NLMSG_DONE, NLMSG_ERROR

RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWTFILTER, RTM_GETTFILTER = 44, 46
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFLA_IFNAME = 3
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_NAME, TCA_BPF_ID = 7, 11
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


def filters_of(data: Iterable[tuple[int, bytes]], parent: int) -> list[tuple[str, int]]:
    """Pure: (program name, program id) of each bpf filter under parent in RTM_NEWTFILTER payloads."""
    out: list[tuple[str, int]] = []
    for msg_type, payload in data:
        if msg_type != RTM_NEWTFILTER or len(payload) < TCMSG.size:
            continue
        if TCMSG.unpack_from(payload)[3] != parent:
            continue
        kind, name, prog_id = "", "", 0
        for t, v in netlink_parse.attributes(payload[TCMSG.size :]):
            if t == TCA_KIND:
                kind = _cstr(v)
            elif t == TCA_OPTIONS:
                for ot, ov in netlink_parse.attributes(v):
                    if ot == TCA_BPF_NAME:
                        name = _cstr(ov)
                    elif ot == TCA_BPF_ID and len(ov) >= 4:
                        prog_id = struct.unpack_from("=I", ov)[0]
        if kind == "bpf":
            out.append((name, prog_id))
    return out


def _dump(sock: socket.socket, msg_type: int, body: bytes, seq: int) -> list[tuple[int, bytes]]:
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


def status(netns_path: str, hooks: dict[str, tuple[int, str]]) -> dict[str, dict[str, list[tuple[str, int]]]]:
    """{hook: {interface: [(filter program name, id) of the bpf filters on that hook whose name starts
    with the hook's name]}} for every non-loopback interface of the netns; hooks: {hook: (parent, name)}.
    A gone netns gives {}."""
    if not os.path.exists(netns_path):
        return {}

    def work() -> dict[str, dict[str, list[tuple[str, int]]]]:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as s:
            s.settimeout(5)
            links = links_of(_dump(s, RTM_GETLINK, IFINFOMSG.pack(0, 0, 0, 0, 0), 1))
            out: dict[str, dict[str, list[tuple[str, int]]]] = {hook: {} for hook in hooks}
            seq = 2
            for index, ifname in links:
                for hook, (parent, prefix) in hooks.items():
                    try:
                        found = filters_of(_dump(s, RTM_GETTFILTER, TCMSG.pack(0, index, 0, parent, 0), seq), parent)
                    except TcStatusError:  # no clsact qdisc on the interface: no filters
                        found = []
                    seq += 1
                    out[hook][ifname] = [(n, i) for n, i in found if n.startswith(prefix)]
            return out

    return run_in_thread(netns_path, work, name="headrace-tc-status")


def problems(pdir: Path, netns: str, hooks: Iterable[tuple[str, str]]) -> list[str]:
    """Our TC programs (hooks: (program name, hook)) pinned in pdir and on their hook of every pod
    interface, as the pinned program (one netlink pass for all)."""
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
        found = status(netns, {hook: (tc.HOOK_PARENTS[hook], name) for name, hook in hooks})
    except OSError as e:
        return [*found_problems, f"cannot read the TC filters in {netns}: {e}"]
    if not any(found.values()):
        return [*found_problems, f"no pod interface found in {netns}"]
    for prog_name, hook in hooks:
        for ifname, filters in found[hook].items():
            if not filters:
                found_problems.append(f"TC {hook} program missing on {ifname}")
            elif prog_name in pinned and pinned[prog_name] not in {i for _n, i in filters}:
                found_problems.append(f"TC {hook} program on {ifname} is not the pinned one")
    return found_problems
