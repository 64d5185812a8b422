"""Foreign programs on a pod's cgroup at the hooks our programs use: a bypass.

We attach with BPF_F_ALLOW_MULTI, so the kernel runs every program of the pod cgroup at a hook in attach
order (then those of its ancestors). A cgroup/connect4 program attached after ours runs after ours and
sees the address ours wrote: it can write the original destination back (the app then connects past the
proxy) or refuse the connect. Any program on the pod cgroup at one of our attach types that is not one
of our pinned programs is drift; the repair detaches it and logs what it was — the one case where the
agent removes something that is not its own, as with foreign nftables chains. Programs of ancestor
cgroups (node-wide, attached by the host) are not checked.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from node_agent.backends.ebpf import bpfsys, loader, pinning
from node_agent.backends.ebpf.attach import Cgroup

log = logging.getLogger("headrace.backend.ebpf")


def found(c: Cgroup, pdir: Path, wanted: tuple[str, ...]) -> list[tuple[int, int]]:
    """(program id, attach type) of the programs on the cgroup at our hooks that are not our pinned ones."""
    ours = pinning.pinned_ids(pdir / name for name in wanted)
    types = sorted({loader.PROGRAMS[n][1] for n in wanted})
    return not_ours({atype: c.attached(atype) for atype in types}, ours)


def not_ours(attached: dict[int, list[int]], ours: set[int]) -> list[tuple[int, int]]:
    """(program id, attach type) of the attached programs (attach type → ids, as queried) not in `ours`."""
    return [(pid, atype) for atype in sorted(attached) for pid in attached[atype] if pid not in ours]


def foreign_problems(path: Path, attached: dict[int, list[int]], ours: set[int]) -> list[str]:
    """The drift texts for the foreign programs among those attached to the cgroup at `path`."""
    return [f"foreign eBPF program id {pid} attached to {path} at attach type {atype} beside ours"
            for pid, atype in not_ours(attached, ours)]


def detach_foreign(cg: Path, pdir: Path, wanted: tuple[str, ...], pod: str) -> int:
    """Detach the foreign programs (gone meanwhile: nothing to do); how many there were."""
    with Cgroup(cg) as c:
        return _detach(c, pdir, wanted, pod)


def _detach(c: Cgroup, pdir: Path, wanted: tuple[str, ...], pod: str) -> int:
    gone = found(c, pdir, wanted)
    for pid, atype in gone:
        try:
            fd = bpfsys.prog_fd_by_id(pid)
        except bpfsys.BpfSysError:
            continue
        try:
            name = bpfsys.prog_info(fd).name
            c.detach(fd, atype)
        except bpfsys.BpfSysError as e:
            if e.errno not in (errno.ENOENT, errno.EINVAL):
                raise
            continue
        finally:
            os.close(fd)
        log.warning("foreign eBPF program on the pod cgroup removed: id %d (%s), attach type %d", pid, name, atype,
                    extra={"pod": pod, "cgroup": str(c.path), "step": "ebpf-foreign"})
    return len(gone)
