"""Load programs into the kernel side by side: the node's cgroup programs of a pod mode (once per node,
node_programs.py) and a pod's own TC programs.

BPF_PROG_LOAD runs the verifier in the calling thread: ~2.5 ms of CPU for the ambient TCP programs here
(~4 ms with DNS capture; the IPv6 connect and sendmsg programs ~1.1 ms each), ~8 ms for the sidecar ones
(its IPv6 connect ~3.7 ms), ~2 ms for the two TC programs. The loads are independent of each other, and
ctypes releases the GIL around the syscall, so they run on a few threads at once; the slowest programs start
first (biggest first packs best). All or nothing: when one load fails, the programs already loaded are
closed and the first error (in the caller's order) is raised.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from node_agent.backends.ebpf import bpfsys
from node_agent.backends.ebpf.loader import LICENSE, CompiledObject, function_of
from node_agent.kernel.home_netns import go_home

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            workers = max(2, min(4, os.cpu_count() or 2))
            # a worker starts in the netns of the thread that submitted (an apply stays in the pod's):
            # it goes home first, or it would keep that pod netns alive
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ebpf-load", initializer=go_home)
        return _pool


def load_programs(
    obj: CompiledObject, fds: dict[str, int], names: Sequence[str], *, ambient: bool, node: bool = False
) -> dict[str, int]:
    """name → fd of each loaded program (the caller closes them), each from the function of the pod's mode
    (loader.function_of; node: the node-wide programs'); BpfSysError when one does not load."""
    if len(names) < 2:
        return {name: _load(obj, fds, name, ambient, node) for name in names}
    return start_loads(obj, fds, names, ambient=ambient, node=node).wait()


class PendingLoads:
    """Loads under way on the pool (the map fds they were given must stay open until they end): `wait` for
    the programs, or `discard` them."""

    def __init__(self, names: Sequence[str], futures: dict[str, Future[int]]) -> None:
        self.names = tuple(names)
        self.futures = futures

    def wait(self) -> dict[str, int]:
        """`load_programs`' answer (all or nothing)."""
        loaded: dict[str, int] = {}
        error: BaseException | None = None
        for name in self.names:
            try:
                loaded[name] = self.futures[name].result()
            except BaseException as exc:  # re-raised below, once every load has ended
                if error is None:
                    error = exc
        if error is not None:
            for fd in loaded.values():
                os.close(fd)
            raise error
        return loaded

    def discard(self) -> None:
        """Wait for the loads to end and close what they loaded (the caller's step failed meanwhile)."""
        for future in self.futures.values():
            if future.exception() is None:  # (waits for it) a load that failed left nothing to close
                os.close(future.result())


def start_loads(
    obj: CompiledObject, fds: dict[str, int], names: Sequence[str], *, ambient: bool, node: bool = False
) -> PendingLoads:
    """Start the loads (biggest first) and return at once: the caller goes on with its own work while the
    verifier runs on the pool's threads (ctypes releases the GIL around the syscall)."""
    order = sorted(names, key=lambda n: len(obj.programs[function_of(n, ambient, node=node)].insns), reverse=True)
    return PendingLoads(names, {name: _executor().submit(_load, obj, fds, name, ambient, node) for name in order})


def _load(obj: CompiledObject, fds: dict[str, int], name: str, ambient: bool, node: bool) -> int:
    prog = obj.programs[function_of(name, ambient, node=node)]
    return bpfsys.prog_load(prog.prog_type, prog.patched(fds), name, prog.attach_type, LICENSE)
