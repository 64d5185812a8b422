"""Programs on a pod's ancestor cgroups (e.g. kubepods.slice, the cgroup2 root) that can override ours.

With BPF_F_ALLOW_MULTI at every level the kernel runs, at each hook, the pod cgroup's programs and then
its ancestors' (`BPF_F_QUERY_EFFECTIVE` lists them in run order; an ancestor's program attached with
BPF_F_PREORDER runs before ours instead). An ancestor's program at a hook whose context ours writes can
undo the redirect: `connect4/6` and `sendmsg4/6` can write the original destination back after ours,
`recvmsg4/6` and `getpeername4/6` can change the addresses the app sees, `getsockopt` can change the
SO_ORIGINAL_DST answer the proxy reads. `sock_ops` and `sock_create` programs cannot change where a
socket connects and are not reported.

These programs belong to the node (a CNI, a security agent, systemd), not to the pod: the agent never
detaches them. The drift check reports each one (`ALERTS`: a warning log line, the pod's `status`
reason and `headrace_agent_ebpf_parent_program_*` metrics) and leaves the decision to the operator.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from node_agent.backends.ebpf import bpfsys, loader, pinning
from node_agent.backends.ebpf.attach import Cgroup, CgroupError, cgroup2_mounts
from node_agent.backends.ebpf.parent_alerts import ALERTS

HOOK_NAMES = {
    bpfsys.ATTACH_CGROUP_INET4_CONNECT: "connect4", bpfsys.ATTACH_CGROUP_INET6_CONNECT: "connect6",
    bpfsys.ATTACH_CGROUP_UDP4_SENDMSG: "sendmsg4", bpfsys.ATTACH_CGROUP_UDP6_SENDMSG: "sendmsg6",
    bpfsys.ATTACH_CGROUP_UDP4_RECVMSG: "recvmsg4", bpfsys.ATTACH_CGROUP_UDP6_RECVMSG: "recvmsg6",
    bpfsys.ATTACH_CGROUP_INET4_GETPEERNAME: "getpeername4", bpfsys.ATTACH_CGROUP_INET6_GETPEERNAME: "getpeername6",
    bpfsys.ATTACH_CGROUP_GETSOCKOPT: "getsockopt",
}  # fmt: skip


@functools.cache
def checked_types(wanted: tuple[str, ...]) -> tuple[int, ...]:
    """Pure: the attach types of the wanted programs where an ancestor's program can override ours (asked
    for every pod every drift interval: remembered per program set)."""
    return tuple(sorted({loader.PROGRAMS[n][1] for n in wanted} & HOOK_NAMES.keys()))


def _holder(cg: Path, prog_id: int, atype: int) -> Path | None:
    """The ancestor cgroup the program is attached to (read only when something was found)."""
    roots = set(cgroup2_mounts())
    for parent in cg.parents:
        try:
            with Cgroup(parent) as c:
                if prog_id in c.attached(atype):
                    return parent
        except (CgroupError, bpfsys.BpfSysError):
            pass
        if parent in roots:
            break
    return None


def _name(prog_id: int) -> str:
    try:
        fd = bpfsys.prog_fd_by_id(prog_id)
    except bpfsys.BpfSysError:
        return "?"
    try:
        return bpfsys.prog_info(fd).name or "?"
    finally:
        os.close(fd)


Ids = Mapping[int, list[int]]  # attach type → program ids


def found(cg: Path, wanted: tuple[str, ...], ours: Callable[[], set[int]], attached: Ids | None = None,
          effective: Ids | None = None) -> list[str]:
    """One line per program that runs for the pod cgroup at a checked hook, is not attached to the pod
    cgroup itself and is not one of ours (ours: read only when something else runs). attached, effective:
    the pod cgroup's own ids and the ids that run for it, per attach type, as the caller just read them
    (else read here)."""
    types = checked_types(wanted)
    given_own, given_run = attached or {}, effective or {}
    if all(t in given_own and t in given_run for t in types):  # the drift check's read: nothing to open
        views = [(t, given_own[t], given_run[t]) for t in types]
    else:
        with Cgroup(cg) as c:
            views = [(t, given_own[t] if t in given_own else c.attached(t),
                      given_run[t] if t in given_run else bpfsys.prog_query(c.fd, t, bpfsys.F_QUERY_EFFECTIVE))
                     for t in types]
    candidates = [(pid, atype) for atype, own, run in views for pid in run if pid not in own]
    if not candidates:
        return []
    mine = ours()
    return [f"eBPF program id {pid} ({_name(pid)}) on parent cgroup {_holder(cg, pid, atype) or '?'} at "
            f"cgroup/{HOOK_NAMES[atype]} runs for the pod's sockets and can override the redirect"
            for pid, atype in candidates if pid not in mine]


def watch_parents(pod: str, cg: Path, pdir: Path, wanted: tuple[str, ...], node_pins: Iterable[Path],
                  attached: Ids | None = None, effective: Ids | None = None) -> None:
    """The drift check's part: record what runs from the ancestors now (a failed read records nothing new)."""
    def ours() -> set[int]:
        return pinning.pinned_ids([*(pdir / n for n in wanted), *node_pins])

    try:
        ALERTS.update(pod, found(cg, wanted, ours, attached, effective))
    except (CgroupError, bpfsys.BpfSysError, OSError):
        return
