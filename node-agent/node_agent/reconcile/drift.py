"""The drift check: every drift interval (and right after pods were enrolled on rules found in place) each
enrolled pod's redirection is read back and what is missing or altered is re-applied (counted in
headrace_agent_drift_repairs). The read-back runs outside the lock, one pod at a time; a CNI request that
arrives meanwhile is served before the next pod. A pod whose pinned netns is gone: an ambient pod is
`failed` and retried (never reported enrolled), a sidecar pod is removed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from node_agent.backends.base import BackendError, PodTarget, RedirectBackend
from node_agent.netns.pin import PinError
from node_agent.reconcile.choice import Backends
from node_agent.reconcile.pod_netns import PodNetns
from node_agent.reconcile.state import ENROLLED, FAILED, PENDING, SIDECAR, PodState, log_ctx
from node_agent.reconcile.table import PodTable

log = logging.getLogger("headrace.agent.reconcile")

Job = tuple[PodState, RedirectBackend, PodTarget]


class DriftCheck:
    def __init__(
        self,
        table: PodTable,
        netns: PodNetns,
        backends: Backends,
        *,
        interval: float,
        remove_sidecar: Callable[[str], None],
    ) -> None:
        self.table = table
        self.netns = netns
        self.backends = backends
        self.interval = interval
        self._remove_sidecar = remove_sidecar
        self.last_run = 0.0
        self._soon = False  # pods were enrolled on rules found in place: run the drift pass now

    def verify_soon(self) -> None:
        self._soon = True

    def take_due(self, now: float) -> bool:
        """Whether this pass runs the check (lock held); if so, it counts as run now."""
        if now - self.last_run < self.interval and not self._soon:
            return False
        self.last_run, self._soon = now, False
        return True

    def run(self, stopping: Callable[[], bool], serve_waiting: Callable[[], None]) -> None:
        """Re-check (and repair) every pod held. The lock is taken to pick the pod and again to act on what
        was read, after making sure the pod is still the one that was read. serve_waiting (lock held) runs
        a converge step for CNI requests that arrived meanwhile."""
        with self.table.lock:
            todo = list(self.table.pods)
        for uid in todo:
            if stopping():
                return
            with self.table.lock:
                serve_waiting()
                job = self._job(uid)
            if job is None:
                continue
            st, backend, target = job
            try:
                result: list[str] | BackendError = backend.check(target, st.spec)
            except BackendError as exc:
                result = exc
            with self.table.lock:
                if self.table.pods.get(uid) is not st or st.inode != target.netns_inode:
                    continue  # removed or replaced meanwhile: its new state is checked next time
                if st.mode == SIDECAR or st.state == ENROLLED:
                    before = (st.state, st.reason)
                    self._repair(st, backend, target, result)
                    if (st.state, st.reason) != before:
                        self.table.notify()

    def _job(self, uid: str) -> Job | None:
        """What the check reads for this pod (lock held); None: nothing to check."""
        st = self.table.pods.get(uid)
        if st is None or (st.mode != SIDECAR and st.state != ENROLLED):
            return None
        try:
            target = self.netns.target(st)
            backend = self.backends.of(st)
        except PinError as exc:
            if st.mode == SIDECAR:
                log.info("sidecar pod netns gone: %s", exc, extra=log_ctx(st, "drift"))
                self._remove_sidecar(uid)
            else:
                st.state, st.netns, st.inode, st.rules_in = PENDING, "", 0, False
                self.table.fail(st, f"pinned netns lost: {exc}")
            return None
        except BackendError as exc:
            self._failed(st, exc)
            return None
        return st, backend, target

    def _failed(self, st: PodState, exc: Exception) -> None:
        if st.mode == SIDECAR:
            st.state, st.reason = FAILED, f"drift repair: {exc}"
            log.warning("sidecar drift repair failed: %s", exc, extra=log_ctx(st, "drift"))
        else:
            self.table.fail(st, f"drift repair: {exc}")

    def _repair(self, st: PodState, backend: RedirectBackend, target: PodTarget,
                result: list[str] | BackendError) -> None:
        """Act on what was read: re-apply what is missing or altered. A sidecar pod (its state may be
        `failed` from an earlier repair) is `enrolled` again once intact."""
        sidecar = st.mode == SIDECAR
        try:
            if isinstance(result, BackendError):
                raise result
            if result:
                log.warning("drift found, repairing: %s", "; ".join(result), extra=log_ctx(st, "drift"))
                backend.apply(target, st.spec)
                self.table.metrics.drift_repaired()
                if sidecar and st.state != ENROLLED:
                    st.enrolled_at = time.time()
            if sidecar:
                st.state = ENROLLED
                if st.reason.startswith("drift repair"):
                    st.reason = ""
        except (BackendError, OSError) as exc:
            self._failed(st, exc)
