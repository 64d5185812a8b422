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


def checked_types(wanted: Iterable[str]) -> list[int]:
    """Pure: the attach types of the wanted programs where an ancestor's program can override ours."""
    return sorted({loader.PROGRAMS[n][1] for n in wanted} & HOOK_NAMES.keys())


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


def found(cg: Path, wanted: Iterable[str], ours: Callable[[], set[int]],
          attached: Mapping[int, list[int]] | None = None) -> list[str]:
    """One line per program that runs for the pod cgroup at a checked hook, is not attached to the pod
    cgroup itself and is not one of ours (ours: read only when something else runs). attached: the pod
    cgroup's own ids per attach type, as the caller just read them (else read here)."""
    candidates: list[tuple[int, int]] = []
    with Cgroup(cg) as c:
        for atype in checked_types(wanted):
            own = set(attached[atype] if attached is not None and atype in attached else c.attached(atype))
            candidates += [(pid, atype) for pid in bpfsys.prog_query(c.fd, atype, bpfsys.F_QUERY_EFFECTIVE)
                           if pid not in own]
    if not candidates:
        return []
    mine = ours()
    return [f"eBPF program id {pid} ({_name(pid)}) on parent cgroup {_holder(cg, pid, atype) or '?'} at "
            f"cgroup/{HOOK_NAMES[atype]} runs for the pod's sockets and can override the redirect"
            for pid, atype in candidates if pid not in mine]


def watch_parents(pod: str, cg: Path, pdir: Path, wanted: tuple[str, ...], node_pins: Iterable[Path],
                  attached: Mapping[int, list[int]] | None = None) -> None:
    """The drift check's part: record what runs from the ancestors now (a failed read records nothing new)."""
    def ours() -> set[int]:
        return pinning.pinned_ids([*(pdir / n for n in wanted), *node_pins])

    try:
        ALERTS.update(pod, found(cg, wanted, ours, attached))
    except (CgroupError, bpfsys.BpfSysError, OSError):
        return
