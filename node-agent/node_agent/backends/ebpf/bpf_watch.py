"""The node's change count: how many bpf(2) commands other processes ran that can change a pod's eBPF
redirection.

Nothing announces an attach, a detach or a map write, so the drift check reads every eBPF pod back each
interval. Two tracepoint programs (bpf/redirect.c) count the commands that can: program attach and detach
(cgroup hooks, tcx), link create, update and detach, map element updates and deletes, from any process but
the agent (told its pid namespace and pid in `hr_watch_self`). `hr_bpf_watch` on `syscalls:sys_enter_bpf`
marks the thread running one, `hr_bpf_watch_exit` on `sys_exit_bpf` counts it when it returns: its effect
is then there to be read, so a check that read the count before cannot take a half-done command for none.
While the count stands still, a pod found intact still is as far as its cgroup programs and node-map
entries go (`intact_cache`). Commands on maps and programs that are not ours count too, so on a node
where another agent writes its maps all the time the count moves at every poll and the check reads as much
as without it.

The programs run on perf events of the tracepoints (any CPU; their ids read from tracefs, mounted for the
read on a directory of our own when the node has it nowhere), held by this process: they are gone with the
agent, and a new agent counts afresh. Where any of it is missing (no syscall tracepoints, no tracefs, no
`bpf_get_ns_current_pid_tgid`), `start` raises and the check reads everything each poll, as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import struct
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from cni.kernel.netns import libc
from node_agent.backends.base import BackendError
from node_agent.backends.ebpf import bpfsys, loader

log = logging.getLogger("headrace.backend.ebpf")

PROGRAMS = {"hr_bpf_watch": "sys_enter_bpf", "hr_bpf_watch_exit": "sys_exit_bpf"}  # program: its tracepoint
SELF_MAP, COUNT_MAP = loader.WATCH_MAPS[:2]  # and the threads inside a counted command
TRACEFS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
SYS_PERF_EVENT_OPEN = 298  # x86_64
PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 8
PERF_ATTR_SIZE = 128
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_SET_BPF = 0x40042408
_ZERO = struct.pack("=I", 0)


class WatchError(Exception):
    """The change count cannot run on this node; the message says what is missing."""


def tracepoint_ids(names: tuple[str, ...], roots: tuple[Path, ...] = TRACEFS,
                   scratch: Path | None = None) -> dict[str, int]:
    """The ids of these syscalls:* tracepoints, from a tracefs already mounted, else from one mounted for
    the read on a fresh directory under `scratch` (unmounted and removed after)."""
    for root in roots:
        with contextlib.suppress(OSError, ValueError):
            return _read_ids(root, names)
    if scratch is None:
        raise WatchError("no tracefs with syscall tracepoints is mounted")
    where = Path(tempfile.mkdtemp(prefix="tracefs-", dir=scratch))
    try:
        res = subprocess.run(["mount", "-t", "tracefs", "nodev", str(where)], capture_output=True, text=True,
                             check=False)  # fmt: skip
        if res.returncode != 0:
            raise WatchError(f"cannot mount a tracefs: {res.stderr.strip() or 'mount failed'}")
        try:
            return _read_ids(where, names)
        except (OSError, ValueError) as e:
            raise WatchError(f"no syscalls/{names[0]} tracepoint (kernel without syscall tracepoints?): {e}") from e
        finally:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
    finally:
        with contextlib.suppress(OSError):
            where.rmdir()


def _read_ids(root: Path, names: tuple[str, ...]) -> dict[str, int]:
    return {name: int((root / "events" / "syscalls" / name / "id").read_text()) for name in names}


def _perf_event_open(tp_id: int) -> int:
    attr = ctypes.create_string_buffer(PERF_ATTR_SIZE)
    struct.pack_into("=IIQQ", attr, 0, PERF_TYPE_TRACEPOINT, PERF_ATTR_SIZE, tp_id, 1)  # type, size, config, period
    # every pid; opened on cpu 0, the programs of a tracepoint run on every CPU
    fd = int(libc().syscall(SYS_PERF_EVENT_OPEN, attr, -1, 0, -1, PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise WatchError(f"perf_event_open of the tracepoint failed: {os.strerror(err)}")
    return fd


class BpfWatch:
    """The running count: `generation()` reads it. Thread-safe (one map lookup per call)."""

    def __init__(self, count_fd: int, fds: list[int]) -> None:
        self._count_fd = count_fd
        self._fds = fds  # the maps, the program and the perf event, closed together

    @classmethod
    def start(cls, obj: loader.CompiledObject, scratch: Path) -> BpfWatch:
        """Load and attach the count (raises WatchError, OSError)."""
        fds: list[int] = []
        try:
            maps = {}
            for name in loader.WATCH_MAPS:
                maps[name] = bpfsys.map_create(obj.maps[name], name)
                fds.append(maps[name])
            ns = os.stat("/proc/self/ns/pid")
            bpfsys.map_update(maps[SELF_MAP], _ZERO, struct.pack("=QQII", ns.st_dev, ns.st_ino, os.getpid(), 0))
            ids = tracepoint_ids(tuple(PROGRAMS.values()), scratch=scratch)
            for name in sorted(PROGRAMS, reverse=True):  # the exit's first: no mark is left uncounted
                prog = obj.programs[name]
                prog_fd = bpfsys.prog_load(prog.prog_type, prog.patched(maps), name, 0, loader.LICENSE)
                fds.append(prog_fd)
                event = _perf_event_open(ids[PROGRAMS[name]])
                fds.append(event)
                fcntl.ioctl(event, PERF_EVENT_IOC_SET_BPF, prog_fd)
                fcntl.ioctl(event, PERF_EVENT_IOC_ENABLE, 0)
        except (bpfsys.BpfSysError, KeyError) as e:
            _close(fds)
            raise WatchError(f"the change count's program or maps: {e}") from e
        except BaseException:
            _close(fds)
            raise
        return cls(maps[COUNT_MAP], fds)

    def generation(self) -> int | None:
        """The count now (None: closed, or unreadable)."""
        try:
            raw = bpfsys.map_lookup(self._count_fd, _ZERO, 8)
        except (OSError, ValueError):
            return None
        return struct.unpack("=Q", raw)[0] if raw is not None else None

    def close(self) -> None:
        fds, self._fds, self._count_fd = self._fds, [], -1
        _close(fds)


def _close(fds: list[int]) -> None:
    for fd in reversed(fds):
        with contextlib.suppress(OSError):
            os.close(fd)


class ChangeCount:
    """The eBPF backend's count, started at its first read once the compiled object is there; a count that
    cannot start is said once in the log and not tried again (reads are None: every poll reads in full)."""

    def __init__(self, enabled: bool, scratch: Path) -> None:
        self.enabled = enabled
        self.scratch = scratch
        self.watch: BpfWatch | None = None
        self.problem: str | None = None

    def read(self, obj: Callable[[], loader.CompiledObject]) -> int | None:
        """The count now, or None (off, not started yet, or cannot run here). obj: the compiled object
        (BackendError while it is being compiled: then tried again at the next read)."""
        if self.watch is None:
            if not self.enabled or self.problem is not None:
                return None
            try:
                compiled = obj()
            except BackendError:  # not compiled yet (or not at all): the next read tries again
                return None
            try:
                self.watch = BpfWatch.start(compiled, self.scratch)
            except (WatchError, OSError) as e:
                self.problem = str(e)
                log.warning("ebpf change count unavailable: %s; every eBPF pod is read back in full each poll",
                            e, extra={"event": "ebpf_change_count", "error": str(e)})
                return None
            log.info("ebpf change count started", extra={"event": "ebpf_change_count"})
        return self.watch.generation()

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
