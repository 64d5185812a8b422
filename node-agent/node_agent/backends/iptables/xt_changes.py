"""Legacy pods the drift poll need not read: the node's x_tables change count.

Legacy iptables tables announce nothing, so the agent reads every legacy pod's tables back each
`--drift-interval` (`xt_digest`, ~0.3 ms a pod). Every change to them is a whole-table replace, and the
node's x_tables change count (`bpf_watch.XT_WATCH`: tracepoint programs on setsockopt(2) and io_uring)
counts the replaces of every other process. A pod whose last read, made after the count was read, found
its rules as verified reads the same while the count has not moved: `unchanged` answers for it and the
drift pass skips it. What else could change it is read anyway: an ambient pod's policy routing (announced
over rtnetlink: its check is not skipped), a sidecar pod in TPROXY mode (its routing is part of its check:
never skipped). Every apply or removal of the agent's forgets the pod; a pod is read in full at least
once a minute (`full_reads`: a replace no tracepoint saw: a 32-bit process's), and at every backstop pass.

The count's programs come from the eBPF object (`loader`, compiled once in a child and kept in the state
dir), compiled in the background from the agent's start (`IptablesBackend.prepare`); where it cannot be
(no bcc, no kernel headers, no tracepoints), every legacy pod is polled as before (said once in the log).
`HEADRACE_XT_CHANGE_COUNT=0` in the agent's environment turns the count off.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from cni.contract.spec import AmbientSpec
from node_agent.backends.base import BackendError, RedirectSpec
from node_agent.backends.ebpf import loader
from node_agent.backends.ebpf.bpf_watch import XT_WATCH, ChangeCount, WatchError
from node_agent.backends.full_reads import full_read_period

COUNT_ENV = "HEADRACE_XT_CHANGE_COUNT"  # 0/false/no/off: no count (`env_switch`)
MAX_PODS = 65536  # pods remembered; beyond that all are forgotten (then re-learnt)


class QuietLegacyPods:
    """The count (`read`), and per pod the count of its last intact read (`intact`). Thread-safe."""

    def __init__(self, scratch: Path, enabled: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.count = ChangeCount(enabled, scratch, XT_WATCH)
        self._count_lock = threading.Lock()
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[int, RedirectSpec, float]] = {}  # uid -> (count, spec, full read due)
        self._compiling = False
        self._now = clock
        if enabled:
            loader.use_cache_dir(scratch / loader.CACHE_DIR)  # compiled objects kept between agent runs

    def _object(self) -> loader.CompiledObject:
        """The compiled object; BackendError while it is compiled (started in the background by the first
        call, never in the caller), WatchError when there will be none."""
        if not self._compiling:
            missing = [] if loader.cached_available() else loader.toolchain_problems()
            if missing:  # said as this count's problem, not as eBPF failing on an iptables node
                raise WatchError(f"no eBPF object for the count: {'; '.join(missing)}")
            self._compiling = True
            loader.compile_in_background(lambda _obj: None)
        if loader.busy():
            raise BackendError("the eBPF object is being compiled")
        try:
            return loader.compile_object()
        except loader.ToolchainError as e:
            raise WatchError(f"no eBPF object for the count: {e}") from e

    def read(self) -> int | None:
        """The count now (None: not running, or not to be trusted now)."""
        with self._count_lock:
            return self.count.read(self._object)

    def intact(self, uid: str, spec: RedirectSpec, count: int | None) -> None:
        """The pod's rules were read and found as verified, after the count was read as `count`."""
        if count is None:
            self.forget(uid)
            return
        with self._lock:
            if len(self._seen) >= MAX_PODS and uid not in self._seen:
                self._seen.clear()
            self._seen[uid] = (count, spec, self._now() + full_read_period(uid))

    def forget(self, uid: str) -> None:
        with self._lock:
            self._seen.pop(uid, None)

    def unchanged(self, polls: Iterable[tuple[str, RedirectSpec, bool]]) -> set[str]:
        """Of the polls ((uid, spec, whether only the unannounced part is due)), the pods whose read would
        find what their last intact read found: the count where it was then, the same spec, the full read
        not due. An ambient pod only when its rules alone are due (its routing is read otherwise)."""
        polls = list(polls)
        if not polls:
            return set()
        now_count = self.read()
        if now_count is None:
            return set()
        now = self._now()
        out: set[str] = set()
        with self._lock:
            for uid, spec, only_rules in polls:
                seen = self._seen.get(uid)
                if (seen is not None and seen[0] == now_count and seen[1] == spec and now < seen[2]
                        and (only_rules or not isinstance(spec, AmbientSpec))):
                    out.add(uid)
        return out
