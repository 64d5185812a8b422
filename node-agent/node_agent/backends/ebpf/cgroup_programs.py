"""headrace's programs on one cgroup v2 directory: find them (pinned or not, by name), detach them, and
undo a half-done attach; and which programs a spec needs there."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from cni.contract.spec import AmbientSpec
from node_agent.backends.base import RedirectSpec
from node_agent.backends.ebpf import bpfsys, loader, pinning
from node_agent.backends.ebpf.attach import Cgroup, CgroupError

log = logging.getLogger("headrace.backend.ebpf")

# getpeername4/6: a redirected socket's peer name is the destination the app dialled (TCP and DNS)
TCP_PROGRAMS = ("hr_connect4", "hr_connect6", "hr_sockops", "hr_getsockopt", "hr_getpeername4", "hr_getpeername6")
DNS_PROGRAMS = ("hr_sendmsg4", "hr_sendmsg6", "hr_recvmsg4", "hr_recvmsg6")
# sidecar: the proxy uid/gid is the socket creator's (as iptables' owner match), recorded at socket creation
SIDECAR_PROGRAMS = ("hr_sock_create",)
OUR_ATTACH_TYPES = tuple(sorted({loader.PROGRAMS[p][1] for p in loader.PROGRAMS}))


def wanted_programs(spec: RedirectSpec) -> tuple[str, ...]:
    """The cgroup programs a spec needs (the TC program is separate: see wants_tc)."""
    if isinstance(spec, AmbientSpec):
        return TCP_PROGRAMS + DNS_PROGRAMS if spec.capture_dns else TCP_PROGRAMS
    return SIDECAR_PROGRAMS + TCP_PROGRAMS


def attach_wanted(
    cg: Path, pdir: Path, wanted: tuple[str, ...], progs: dict[str, int], done: list[tuple[int, int, int | None]],
    olds: dict[str, int], *, fresh: bool = False,
) -> bool:
    """Attach each wanted program (name → fd in progs) to the cgroup in place of the one pinned for the pod
    (BPF_F_REPLACE: the hook never runs without one of ours), and detach the pinned ones no longer wanted.
    Appends to `done` (new fd, attach type, replaced fd) for `rollback`, and to `olds` the fds of the
    pinned programs it opened (the caller closes them). fresh: the pod directory is new (nothing pinned to
    replace or drop). Returns whether one of the pod's programs was attached at a wanted hook already."""
    had = False
    with Cgroup(cg) as c:
        for name in wanted:
            atype = loader.PROGRAMS[name][1]
            attached = c.attached(atype)
            old = None
            if attached:  # an empty hook (a new pod's) has nothing to keep or replace
                if bpfsys.prog_info(progs[name]).prog_id in attached:
                    had = True
                    continue  # the node's program is there already (an apply that repairs something else)
                old = None if fresh else pinning.open_pinned(pdir / name)
                if old is not None:
                    olds[name] = old
                    if bpfsys.prog_info(old).prog_id not in attached:
                        old = None
                if old is None:  # an unpinned program of ours (crash mid-apply) must not stay twice
                    detach_ours_by_name(c, only_type=atype)
                had = had or old is not None
            c.attach(progs[name], atype, replace_fd=old)
            done.append((progs[name], atype, old))
        for child in [] if fresh else list(pdir.iterdir()):  # programs no longer wanted (DNS switched off)
            if child.name in loader.PROGRAMS and child.name not in wanted:
                detach_pinned(c, child)
    return had


def rollback(cg: Path, done: list[tuple[int, int, int | None]]) -> None:
    try:
        with Cgroup(cg) as c:
            for new, atype, old in reversed(done):
                try:
                    if old is not None:
                        c.attach(old, atype, replace_fd=new)
                    else:
                        c.detach(new, atype)
                except bpfsys.BpfSysError:
                    log.warning("ebpf rollback step failed", extra={"cgroup": str(cg)})
    except CgroupError:
        pass


def detach_pinned(c: Cgroup, path: Path) -> None:
    fd = pinning.open_pinned(path)
    if fd is None:
        return
    try:
        c.detach(fd, loader.PROGRAMS[path.name][1])
    except bpfsys.BpfSysError as e:
        if e.errno not in (errno.ENOENT, errno.EINVAL):
            raise
    finally:
        os.close(fd)
    pinning.unpin(path)


def ours_attached(c: Cgroup, only_type: int | None = None) -> list[tuple[int, int]]:
    """(program id, attach type) of headrace programs attached to this cgroup, pinned or not."""
    found: list[tuple[int, int]] = []
    for atype in OUR_ATTACH_TYPES if only_type is None else (only_type,):
        for pid in c.attached(atype):
            try:
                fd = bpfsys.prog_fd_by_id(pid)
            except bpfsys.BpfSysError:
                continue
            try:
                if bpfsys.prog_info(fd).name in loader.PROGRAMS:
                    found.append((pid, atype))
            finally:
                os.close(fd)
    return found


def detach_ours_by_name(c: Cgroup, only_type: int | None = None) -> None:
    for pid, atype in ours_attached(c, only_type):
        try:
            fd = bpfsys.prog_fd_by_id(pid)
        except bpfsys.BpfSysError:
            continue
        try:
            c.detach(fd, atype)
        except bpfsys.BpfSysError as e:
            if e.errno not in (errno.ENOENT, errno.EINVAL):
                raise
        finally:
            os.close(fd)
