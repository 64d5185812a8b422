"""What the drift check found on a pod's ancestor cgroups (`parent_progs`): kept per pod for `status`, the
metrics and one log line per change. Process-wide, like the iptables check counts; thread-safe."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

log = logging.getLogger("headrace.backend.ebpf")


class ParentAlerts:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_pod: dict[str, tuple[str, ...]] = {}
        self._alerts = 0  # new (pod, finding) pairs seen: headrace_agent_ebpf_parent_program_alerts_total

    def update(self, pod: str, found: Iterable[str]) -> None:
        """The pod's findings now; each new one is counted and logged (a warning), a cleared set logged."""
        now = tuple(sorted(set(found)))
        with self._lock:
            before = self._by_pod.get(pod, ())
            if now == before:
                return
            new = [f for f in now if f not in before]
            self._alerts += len(new)
            if now:
                self._by_pod[pod] = now
            else:
                self._by_pod.pop(pod, None)
        for finding in new:
            log.warning("eBPF program on a parent cgroup can override the redirect (not removed: not ours): %s",
                        finding, extra={"pod": pod, "step": "ebpf-parent-cgroup"})
        if not now:
            log.info("no eBPF program on the parent cgroups can override the redirect any more",
                     extra={"pod": pod, "step": "ebpf-parent-cgroup"})

    def clear(self, pod: str) -> None:
        with self._lock:
            self._by_pod.pop(pod, None)

    def of(self, pod: str) -> tuple[str, ...]:
        with self._lock:
            return self._by_pod.get(pod, ())

    def snapshot(self) -> dict[str, int]:
        """pods: pods with findings now; alerts: findings seen since start (a counter)."""
        with self._lock:
            return {"pods": len(self._by_pod), "alerts": self._alerts}


ALERTS = ParentAlerts()
