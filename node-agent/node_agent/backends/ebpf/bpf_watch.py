"""The node's change count: how many bpf(2) commands other processes ran that can change a pod's eBPF
redirection.

Nothing announces an attach, a detach or a map write, so the drift check reads every eBPF pod back each
interval. Two tracepoint programs (bpf/redirect.c) count the commands that can: program attach and detach
(cgroup hooks, tcx), link create, update and detach, map element updates and deletes, from any process but
the agent (told its pid namespace and pid in `hr_watch_self`), and of the map commands only those on maps
that may be ours (`hr_watch_layout`: where the kernel keeps a map's name, from its BTF, `btf_layout`; a map
whose name does not start with `hr_` is not ours; without the kernel's BTF every map command counts).
`hr_bpf_watch` on `syscalls:sys_enter_bpf` marks the thread running one, `hr_bpf_watch_exit` on
`sys_exit_bpf` counts it when it returns: its effect is then there to be read, so a check that read the
count before cannot take a half-done command for none. While the count stands still, a pod found intact
still is as far as its cgroup programs and node-map entries go (`intact_cache`). Attaches and detaches of
programs that are not ours count too (rare: a pod starting), and so does every map write where the kernel
has no BTF: on such a node, where another agent writes its maps all the time, the count moves at every poll
and the check reads as much as without it.

The same scheme counts the replaces of legacy iptables tables (`XT_WATCH`: setsockopt(2) and io_uring socket
commands, for the iptables backend on legacy hosts; `BPF_WATCH` is the one above).

The programs run on perf events of the tracepoints (any CPU; their ids read from tracefs, mounted for the
read on a directory of our own when the node has it nowhere), held by this process: they are gone with the
agent, and a new agent counts afresh. Where any of it is missing (no syscall tracepoints, no tracefs, no
`bpf_get_ns_current_pid_tgid`, an io_uring tracepoint laid out otherwise than the program reads it),
`start` raises and the check reads everything each poll, as before. Syscall tracepoints do not see the
system calls of 32-bit processes: a change made by one is found at the pod's next full read.
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
from dataclasses import dataclass
from pathlib import Path

from cni.kernel.netns import libc
from node_agent.backends.base import BackendError
from node_agent.backends.ebpf import bpfsys, btf_layout, loader

log = logging.getLogger("headrace.backend.ebpf")

SELF_MAP = "hr_watch_self"
LAYOUT_MAP = "hr_watch_layout"


@dataclass(frozen=True)
class WatchSpec:
    """One count: its programs in the order they are attached ((program, "group/tracepoint"); each exit before
    its enter, so that no mark is left uncounted), its maps, the map holding the count at index 0 and, with
    `pending`, at index 1 the commands in flight (the count is not trusted while any is). A group in
    `optional` that the kernel does not have (no io_uring) is left out; `layouts`: the fields of a
    tracepoint the program reads, (offset, size) as its format must give them; `map_layout`: the spec has
    `LAYOUT_MAP`, filled with `btf_layout`'s offsets (map writes on other maps not counted)."""

    what: str
    programs: tuple[tuple[str, str], ...]
    maps: tuple[str, ...]
    count_map: str
    pending: bool = False
    optional: tuple[str, ...] = ()
    layouts: tuple[tuple[str, str, int, int], ...] = ()  # (group/tracepoint, field, offset, size)
    map_layout: bool = False


BPF_WATCH = WatchSpec(
    "ebpf change count",
    (("hr_bpf_watch_exit", "syscalls/sys_exit_bpf"), ("hr_bpf_watch", "syscalls/sys_enter_bpf")),
    (SELF_MAP, "hr_bpf_changes", "hr_watch_busy", LAYOUT_MAP), "hr_bpf_changes", map_layout=True,
)
XT_WATCH = WatchSpec(
    "x_tables change count",
    (("hr_xt_watch_exit", "syscalls/sys_exit_setsockopt"), ("hr_xt_watch", "syscalls/sys_enter_setsockopt"),
     ("hr_xt_uring_done", "io_uring/io_uring_complete"), ("hr_xt_uring_submit", "io_uring/io_uring_submit_req")),
    (SELF_MAP, "hr_xt_changes", "hr_xt_busy"), "hr_xt_changes", pending=True, optional=("io_uring",),
    layouts=(("io_uring/io_uring_submit_req", "req", 16, 8), ("io_uring/io_uring_submit_req", "opcode", 32, 1),
             ("io_uring/io_uring_complete", "req", 16, 8)),
)
TRACEFS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
SYS_PERF_EVENT_OPEN = 298  # x86_64
PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 8
PERF_ATTR_SIZE = 128
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_SET_BPF = 0x40042408
_ZERO = struct.pack("=I", 0)
_ONE = struct.pack("=I", 1)
_NONE = bytes(8)


class WatchError(Exception):
    """The change count cannot run on this node; the message says what is missing."""


def tracepoint_ids(spec: WatchSpec, roots: tuple[Path, ...] = TRACEFS,
                   scratch: Path | None = None) -> dict[str, int]:
    """The ids of the spec's tracepoints ("group/name": id; none of an optional group the kernel does not
    have), their layouts checked, from a tracefs already mounted, else from one mounted for the read on a
    fresh directory under `scratch` (unmounted and removed after)."""
    for root in roots:
        with contextlib.suppress(OSError, ValueError):
            return _read_ids(root, spec)
    if scratch is None:
        raise WatchError("no tracefs with syscall tracepoints is mounted")
    where = Path(tempfile.mkdtemp(prefix="tracefs-", dir=scratch))
    try:
        res = subprocess.run(["mount", "-t", "tracefs", "nodev", str(where)], capture_output=True, text=True,
                             check=False)  # fmt: skip
        if res.returncode != 0:
            raise WatchError(f"cannot mount a tracefs: {res.stderr.strip() or 'mount failed'}")
        try:
            return _read_ids(where, spec)
        except (OSError, ValueError) as e:
            raise WatchError(f"no {spec.programs[0][1]} tracepoint (kernel without syscall tracepoints?): {e}") from e
        finally:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
    finally:
        with contextlib.suppress(OSError):
            where.rmdir()


def _read_ids(root: Path, spec: WatchSpec) -> dict[str, int]:
    events = root / "events"
    if not (events / "syscalls").is_dir():
        raise OSError(f"no syscall tracepoints under {root}")
    ids = {event: int((events / event / "id").read_text()) for _, event in spec.programs
           if event.split("/")[0] not in spec.optional or (events / event.split("/")[0]).is_dir()}
    for event, field, offset, size in spec.layouts:
        if event in ids and field_layout((events / event / "format").read_text(), field) != (offset, size):
            raise WatchError(f"tracepoint {event}: its field {field} is not at offset {offset}, size {size}")
    return ids


def field_layout(format_text: str, field: str) -> tuple[int, int] | None:
    """Pure: (offset, size) of a field in a tracepoint's format file, None when it has no such field."""
    for line in format_text.splitlines():
        parts = [p.strip() for p in line.strip().split(";")]
        if len(parts) < 3 or not parts[0].startswith("field:"):
            continue
        name = parts[0].rsplit(None, 1)[-1].lstrip("*").split("[")[0]
        values = dict(p.split(":", 1) for p in parts[1:3] if ":" in p)
        if name == field and values.get("offset", "").isdigit() and values.get("size", "").isdigit():
            return int(values["offset"]), int(values["size"])
    return None


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

    def __init__(self, count_fd: int, fds: list[int], pending: bool = False, maps_told_apart: bool = False) -> None:
        self._count_fd = count_fd
        self._fds = fds  # the maps, the program and the perf event, closed together
        self._pending = pending
        self.maps_told_apart = maps_told_apart  # writes on maps not ours are not counted

    @classmethod
    def start(cls, obj: loader.CompiledObject, scratch: Path, spec: WatchSpec = BPF_WATCH) -> BpfWatch:
        """Load and attach the count (raises WatchError, OSError)."""
        fds: list[int] = []
        try:
            maps = {}
            for name in spec.maps:
                maps[name] = bpfsys.map_create(obj.maps[name], name)
                fds.append(maps[name])
            ns = os.stat("/proc/self/ns/pid")
            bpfsys.map_update(maps[SELF_MAP], _ZERO, struct.pack("=QQII", ns.st_dev, ns.st_ino, os.getpid(), 0))
            offsets = btf_layout.read_offsets() if spec.map_layout else None
            if offsets is not None:
                bpfsys.map_update(maps[LAYOUT_MAP], _ZERO, struct.pack("=8I", 1, *offsets, 0))
            ids = tracepoint_ids(spec, scratch=scratch)
            for name, tracepoint in spec.programs:
                if tracepoint not in ids:
                    continue
                prog = obj.programs[name]
                prog_fd = bpfsys.prog_load(prog.prog_type, prog.patched(maps), name, 0, loader.LICENSE)
                fds.append(prog_fd)
                event = _perf_event_open(ids[tracepoint])
                fds.append(event)
                fcntl.ioctl(event, PERF_EVENT_IOC_SET_BPF, prog_fd)
                fcntl.ioctl(event, PERF_EVENT_IOC_ENABLE, 0)
        except (bpfsys.BpfSysError, KeyError) as e:
            _close(fds)
            raise WatchError(f"the change count's program or maps: {e}") from e
        except BaseException:
            _close(fds)
            raise
        return cls(maps[spec.count_map], fds, spec.pending, offsets is not None)

    def generation(self) -> int | None:
        """The count now (None: closed, unreadable, or with commands in flight)."""
        try:
            raw = bpfsys.map_lookup(self._count_fd, _ZERO, 8)
            pending = bpfsys.map_lookup(self._count_fd, _ONE, 8) if self._pending and raw is not None else _NONE
        except (OSError, ValueError):
            return None
        if raw is None or pending != _NONE:
            return None
        return int(struct.unpack("=Q", raw)[0])

    def close(self) -> None:
        fds, self._fds, self._count_fd = self._fds, [], -1
        _close(fds)


def _close(fds: list[int]) -> None:
    for fd in reversed(fds):
        with contextlib.suppress(OSError):
            os.close(fd)


class ChangeCount:
    """A backend's count, started at its first read once the compiled object is there; a count that cannot
    start is said once in the log and not tried again (reads are None: every poll reads in full)."""

    def __init__(self, enabled: bool, scratch: Path, spec: WatchSpec = BPF_WATCH) -> None:
        self.enabled = enabled
        self.scratch = scratch
        self.spec = spec
        self.watch: BpfWatch | None = None
        self.problem: str | None = None

    def read(self, obj: Callable[[], loader.CompiledObject]) -> int | None:
        """The count now, or None (off, not started yet, cannot run here, or not to be trusted now). obj: the
        compiled object (BackendError while it is being compiled: then tried again at the next read;
        WatchError when there will be none)."""
        if self.watch is None:
            if not self.enabled or self.problem is not None:
                return None
            event = self.spec.what.replace(" ", "_")
            try:
                self.watch = BpfWatch.start(obj(), self.scratch, self.spec)
            except BackendError:  # not compiled yet (or not at all): the next read tries again
                return None
            except (WatchError, OSError) as e:
                self.problem = str(e)
                log.warning("%s unavailable: %s; every pod it covers is read back in full each poll",
                            self.spec.what, e, extra={"event": event, "error": str(e)})
                return None
            if self.spec.map_layout and not self.watch.maps_told_apart:
                log.info("%s started; no kernel BTF (%s): writes on every map count, ours or not", self.spec.what,
                         btf_layout.VMLINUX, extra={"event": event})
            else:
                log.info("%s started", self.spec.what, extra={"event": event})
        return self.watch.generation()

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
