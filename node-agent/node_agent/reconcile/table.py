"""The reconciler's one state table: every pod it holds, ambient or sidecar, keyed by uid, with the lock
that guards it and the bookkeeping every collaborator shares (failure and backoff, the enrolment record,
the removal tail)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from node_agent.reconcile.records import EnrolRecord, RecordStore
from node_agent.reconcile.state import FAILED, Metrics, Mode, Pins, PodState, log_ctx

log = logging.getLogger("headrace.agent.reconcile")


class PodTable:
    def __init__(self, pins: Pins, records: RecordStore, metrics: Metrics, clock: Callable[[], float]) -> None:
        self.pods: dict[str, PodState] = {}
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.pins = pins
        self.records = records
        self.metrics = metrics
        self.clock = clock
        self.on_change: Callable[[], None] | None = None  # after every state change (lock held): status snapshot
        self.holding: dict[str, threading.Event] = {}  # uid -> set once a hold promised to a CNI ADD is done

    def hold_pending(self, uid: str) -> threading.Event:
        """A hold of this pod will follow shortly (lock held): a CNI DEL of it waits for it (`wait_hold`)."""
        done = self.holding[uid] = threading.Event()
        return done

    def hold_done(self, uid: str, done: threading.Event) -> None:
        with self.lock:
            if self.holding.get(uid) is done:
                del self.holding[uid]
        done.set()

    def wait_hold(self, uid: str, timeout: float = 5.0) -> None:
        """Wait (lock not held) until a promised hold of this pod is done."""
        with self.lock:
            done = self.holding.get(uid)
        if done is not None:
            done.wait(timeout)

    def get(self, uid: str, mode: Mode | None = None) -> PodState | None:
        """The pod's state (of that mode only, when given)."""
        st = self.pods.get(uid)
        if st is None or (mode is not None and st.mode != mode):
            return None
        return st

    def of_mode(self, mode: Mode) -> list[PodState]:
        return [st for st in self.pods.values() if st.mode == mode]

    def notify(self) -> None:
        """Wake the CNI requests waiting for a pod's state (lock held); publish the new state."""
        self.cond.notify_all()
        if self.on_change is not None:
            self.on_change()

    def fail(self, st: PodState, reason: str, now: float | None = None) -> None:
        """The pod is `failed` and retried after a backoff that grows with its attempts. A pod whose cgroup
        is gone (eBPF: the pod's processes are all gone, its sandbox torn down before the agent learnt of
        it) is not an enrolment failure: said so, logged at info and not counted."""
        now = self.clock() if now is None else now
        gone = st.cgroup_path is not None and not os.path.isdir(st.cgroup_path)
        st.state = FAILED
        st.reason = f"pod cgroup gone (its sandbox was torn down): {reason}" if gone else reason
        st.attempts += 1
        st.retry_at = now + min(30.0, 0.5 * (2 ** min(st.attempts, 6)))
        st.ack = None
        if gone:
            log.info("enrolment stopped: %s", st.reason, extra=log_ctx(st, "sandbox-gone"))
        else:
            self.metrics.failed(reason.split(":")[0][:40])
            log.warning("enrolment failed: %s", reason, extra=log_ctx(st, "enrol-failed"))
        self.notify()

    def save_record(self, st: PodState) -> None:
        self.records.save(self.record_of(st))

    def bind_add_ips(self, st: PodState, ips: tuple[str, ...]) -> None:
        """Bind a CNI ADD's IPs to the netns the pod is in now, whose sandbox they are (the pod object may
        lag: `with_add_ips`), and keep that in the pod's record; one that cannot be written costs the
        binding after a restart, not the ADD."""
        if st.add_inode == st.inode and st.add_ips == ips:
            return
        st.add_ips, st.add_inode = ips, st.inode
        try:
            self.save_record(st)
        except OSError as exc:
            log.warning("enrolment record not saved: %s", exc, extra=log_ctx(st, "record"))

    def record_of(self, st: PodState) -> EnrolRecord:
        """The pod's enrolment record as it stands (lock held); saved by save_record, or by a job."""
        return EnrolRecord(st.uid, st.namespace, st.name, st.inode, st.ips, st.backend, st.tcp_loose,
                           st.cgroup_path, mode=st.mode, annotations=st.annotations,
                           service_account=st.service_account, leaving=st.leaving,
                           add_ips=st.add_ips if st.add_inode == st.inode else ())

    def forget(self, st: PodState, message: str, step: str) -> None:
        """The end of every removal, once the pod's redirection is out: pin released, record deleted, the
        pod dropped from the table."""
        try:
            self.pins.release(st.uid)
        except OSError as exc:
            log.warning("releasing pin failed: %s", exc, extra=log_ctx(st, "unpin"))
        self.records.delete(st.uid)
        if self.pods.get(st.uid) is st:
            del self.pods[st.uid]
        log.info(message, extra=log_ctx(st, step))
        self.notify()

    def forget_all(self, message: str, step: str) -> int:
        """Every pod still held forgotten (`forget`: pin released, record deleted), its rules left as they
        are: the agent leaves the node for good, and a pin would keep a deleted pod's netns with no agent
        left to release it. How many."""
        with self.lock:
            held = list(self.pods.values())
            for st in held:
                self.forget(st, message, step)
            return len(held)
