"""Ambient pods: enrolment and removal.

Enrolment, in order: locate the netns (the CNI event's CNI_NETNS, an adopted pin, or a /proc scan), pin it
(inode recorded), write the record, tell the proxy and wait for its ack, then install the rules (so a
redirected connection always finds a listener); the pod is `enrolled` only after both. Removal goes the
other way: rules out, proxy told, pin released, record deleted. Connections opened before enrolment are
protected from being redirected mid-stream (nf_conntrack_tcp_loose set to 0, restored on removal).

The rules of many pods go in in parallel: a pass hands every pod whose proxy ack is in to a bounded
worker pool (`APPLY_WORKERS`, `IN_PROCESS_WORKERS` for a backend that applies in-process; the jobs never
take the lock) and, at its end, waits for them all (`finish_jobs`) and makes each pod `enrolled` (or
`failed`). A removal waits for the pod's job first (so its rules cannot go in after the removal).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from cni.contract.kube_objects import Pod
from cni.contract.spec import AmbientSpec
from node_agent.backends.base import AppliesInNetns, BackendError, PodTarget, RedirectBackend
from node_agent.netns.finder import NetnsNotFound
from node_agent.netns.pin import PinError
from node_agent.protocol.workload import WorkloadInfo
from node_agent.reconcile.choice import Backends
from node_agent.reconcile.pod_netns import PodNetns, Scan
from node_agent.reconcile.state import AMBIENT, ENROLLED, FAILED, PENDING, Conntrack, Hub, PodState, log_ctx, same_ips
from node_agent.reconcile.table import PodTable
from node_agent.sources.redirection_mark import ANNOTATION, ENABLED

log = logging.getLogger("headrace.agent.reconcile")

APPLY_WORKERS = 6  # pods whose rules go in at once (each mostly waits on the kernel or a helper process)
# pods whose rules go in at once on a backend that applies in-process (AppliesInNetns: ~0.7 ms of CPU a
# pod, part of it holding the GIL): more threads only fight over the GIL (250 pods on 2 cores: nftables
# p99 0.8 s with 6, 0.6 s with 2; iptables-nft 0.84-0.98 s with 6, 0.54-0.62 s with 2)
IN_PROCESS_WORKERS = 2
JOB_WAIT = 30.0  # the longest a removal waits for the pod's running apply
JOB_POLL = 0.02  # finish_jobs' longest wait between two looks (an apply or ack that ends wakes it at once)
PUBLISH_EVERY = 0.05  # while applies finish: the status rows are rebuilt at most this often
JobResult = tuple[int | None, Exception | None]  # an apply job: nf_conntrack_tcp_loose found before, error


class AmbientEnrolment:
    def __init__(
        self,
        table: PodTable,
        netns: PodNetns,
        backends: Backends,
        hub: Hub,
        conntrack: Conntrack,
        spec: AmbientSpec,
        *,
        node_name: str,
        wake: Callable[[], None],
        verify_soon: Callable[[], None],
    ) -> None:
        self.table = table
        self.netns = netns
        self.backends = backends
        self.hub = hub
        self.conntrack = conntrack
        self.spec = spec
        self.node_name = node_name
        self._wake = wake  # the proxy acked: the loop takes the next step
        self._verify_soon = verify_soon  # rules were found in place: read them back in this pass
        # "in-process" (AppliesInNetns), "spawning" (the others) or "move" (pods changing backend) -> its
        # pool, made when needed
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self.jobs: dict[str, Future[JobResult]] = {}  # uid -> its running (or not yet collected) apply
        # what ended since step_jobs last looked (appended by the futures' callbacks, on any thread): it looks
        # at these only, never at every job or every pod sent (a wave of N pods would cost N² checks)
        self._finished: deque[tuple[str, Future[Any]]] = deque()  # applies
        self._acked: deque[tuple[str, Future[Any]]] = deque()  # proxy acks (the pod's `ack` future)
        self._published, self._unpublished = 0.0, False  # status rows: last rebuilt, changes since

    def close(self) -> None:
        """Agent shutdown: running applies finish; nothing new starts (queued ones are dropped: the next
        agent adopts those pods from their records and finishes them)."""
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)

    def new_state(self, uid: str, namespace: str, name: str) -> PodState:
        return PodState(uid, namespace, name, AMBIENT, self.spec)

    def converge(self, uid: str, pod: Pod, hint_netns: str, now: float, scan: Scan) -> None:
        """One step towards `enrolled` for a pod the source (or a CNI ADD) wants ambient (lock held)."""
        st = self.table.pods.get(uid)
        if st is None:
            st = self.table.pods[uid] = self.new_state(uid, pod.namespace, pod.name)
            st.annotated = pod.annotations.get(ANNOTATION) == ENABLED
        elif st.mode != AMBIENT:
            return  # the plugin handed it over as a sidecar pod: that stays until its DEL or the pod leaves
        st.namespace, st.name = pod.namespace or st.namespace, pod.name or st.name
        st.service_account = pod.service_account
        job = self.jobs.get(uid)
        if job is not None:
            if job.done():
                self._finish_apply(st, self.jobs.pop(uid))
            return  # its rules are going in: new IPs and the rest are looked at once they are
        if pod.ips and st.ips and not same_ips(pod.ips, st.ips) and (st.state == ENROLLED or st.ack is not None):
            # the proxy and the backend (eBPF keeps the pod IPs in its config) must learn the new IPs
            log.info("pod IPs changed (%s -> %s): enrolling again", ",".join(st.ips), ",".join(pod.ips),
                     extra=log_ctx(st, "ips-changed"))
            st.state, st.rules_in, st.ack = PENDING, False, None
        if pod.ips:
            st.ips = pod.ips
        if st.state == ENROLLED:
            return
        if st.state == FAILED and now < st.retry_at:
            return
        if st.ack is not None:
            if st.ack.done():
                self._after_ack(st)
            return
        self._start(st, hint_netns, now, scan)

    def _start(self, st: PodState, hint_netns: str, now: float, scan: Scan) -> None:
        st.state = PENDING
        try:
            self.netns.locate(st, hint_netns, scan)
        except (PinError, LookupError, OSError) as exc:
            if isinstance(exc, NetnsNotFound) and not st.ips:  # a new pod before its ADD: not a failure
                st.reason = "waiting for the pod's sandbox (its CNI ADD, or a process in its netns)"
            else:
                self.table.fail(st, f"netns not found: {exc}", now)
            return
        try:
            if st.annotated:
                self.backends.find_left(st)
                st.annotated = False
            self.backends.settle(st)
        except (BackendError, PinError, OSError) as exc:
            self.table.fail(st, f"backend switch: {exc}", now)
            return
        if not st.ips:
            try:
                st.ips = self.netns.read_ips(st.netns)
            except (OSError, ValueError) as exc:
                log.warning("cannot read pod IPs: %s", exc, extra=log_ctx(st, "read-ips"))
        if not st.ips:
            # not wired yet (its CNI ADD has not run): the proxy identifies workloads by IP, so wait
            st.reason = "waiting for the pod's IPs (CNI ADD or pod status)"
            return
        if st.tcp_loose is not None:  # else the apply job writes the record (with it) before the pod changes;
            self.table.save_record(st)  # until then the pin alone is adopted after a restart
        self.send(st, now)

    def send(self, st: PodState, now: float, *, follow: bool = True) -> None:
        """Tell the proxy hub about the pod (its pinned netns and IPs known); the next steps follow its ack
        (at once if it is already there and `follow`; else in the next pass that converges the pod)."""
        w = WorkloadInfo(
            uid=st.uid, name=st.name, namespace=st.namespace, service_account=st.service_account,
            ips=st.ips, netns_path=st.netns, netns_inode=st.inode, node=self.node_name,
        )
        st.reason = "waiting for proxy ack"
        st.ack_since = now
        try:
            fut = self.hub.upsert(w)
        except Exception as exc:
            self.table.fail(st, f"proxy hub: {exc}", now)
            return
        st.ack = fut
        log.debug("workload sent to proxy", extra=log_ctx(st, "proxy-upsert"))
        fut.add_done_callback(functools.partial(self._ended, self._acked, st.uid))
        if fut.done() and follow:
            self._after_ack(st)

    def _after_ack(self, st: PodState, *, notify: bool = True) -> None:
        fut, st.ack = st.ack, None
        assert fut is not None
        refused = fut.exception()
        if refused is not None:
            self.table.fail(st, f"proxy refused workload: {refused}")
            return
        try:
            # the choice may have changed while the proxy was acking, or since the agent that enrolled an
            # adopted pod (then the old backend's redirection comes out and the new one goes in)
            recorded = st.backend
            self.backends.settle(st)
            if st.backend != recorded:
                self.table.save_record(st)
            target = self.netns.target(st)
            backend = self.backends.of(st)
            if not st.rules_in:
                self._submit(st, target, backend)
                return
            # rules found in place (adopted after a restart, or re-sent to a restarted proxy): the drift
            # pass of this same reconcile reads them back, outside the lock, and repairs them
            self._verify_soon()
        except (BackendError, PinError, OSError) as exc:
            self._rules_failed(st, exc)
            return
        self._enrolled(st, notify=notify)

    def finish_jobs(self) -> None:
        """The end of a pass (lock held): until the applies it started are done, make each pod `enrolled`
        (or `failed`) as soon as its job ends, and start the applies of pods whose proxy ack comes in
        meanwhile (acks and applies overlap). Waits on the table's condition: the lock is free meanwhile
        (CNI requests and status are served). A job stuck past JOB_WAIT is collected by a later pass."""
        deadline = time.monotonic() + JOB_WAIT
        while self.jobs and time.monotonic() < deadline:
            if not self.step_jobs():
                self.table.cond.wait(JOB_POLL)
        self.publish(force=True)

    def step_jobs(self) -> bool:
        """Lock held: every finished apply makes its pod `enrolled` (or `failed`), every pod whose proxy ack
        is in gets its apply started on the pool. The pass also calls it between pods, so applies run and
        pods become enrolled while it is still sending the later ones. True when an apply finished."""
        done = []
        while self._finished:
            uid, fut = self._finished.popleft()
            if self.jobs.get(uid) is not fut:
                continue  # collected meanwhile (converge, wait_job)
            done.append(uid)
            del self.jobs[uid]
            if (st := self.table.get(uid, AMBIENT)) is not None:
                self._finish_apply(st, fut, notify=False)
        acked, later = [], []
        while self._acked:
            uid, ack = self._acked.popleft()
            st = self.table.pods.get(uid)
            if st is None or st.ack is not ack:
                continue  # followed already, failed or gone
            if uid in self.jobs:
                later.append((uid, ack))  # its earlier apply still runs: looked at again next time
            else:
                acked.append(st)
        self._acked.extend(later)
        for st in acked:
            self._after_ack(st, notify=False)
        if done or acked:
            self.table.cond.notify_all()  # waiters see every change at once
            self._unpublished = True
            self.publish()
        return bool(done)

    def publish(self, *, force: bool = False) -> None:
        """Rebuild the status rows (every pod) after step_jobs changed states: at most every PUBLISH_EVERY
        while pods keep finishing; `force`: now, if anything is unpublished."""
        now = time.monotonic()
        if self._unpublished and (force or now - self._published >= PUBLISH_EVERY):
            self.table.notify()
            self._published, self._unpublished = now, False

    def _submit(self, st: PodState, target: PodTarget, backend: RedirectBackend, *, move: bool = False) -> None:
        """Start the pod's conntrack guard and rules on the pool (lock held); `move`: on the moves' own pool,
        one at a time, so enrolments never queue behind a wave of them."""
        in_process = isinstance(backend, AppliesInNetns)
        key = "move" if move else "in-process" if in_process else "spawning"
        pool = self._pools.get(key)
        if pool is None:
            workers = {"move": 1, "in-process": IN_PROCESS_WORKERS, "spawning": APPLY_WORKERS}[key]
            pool = self._pools[key] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="enrol-apply")
        known, record, leaving = st.tcp_loose, self.table.record_of(st), self.backends.leaving(st)
        spec, conntrack, records, ctx = self.spec, self.conntrack, self.table.records, log_ctx(st, "conntrack")

        def job() -> JobResult:
            """The pod's conntrack guard and rules (no lock: nothing else writes this pod's record or
            state while its job runs): the nf_conntrack_tcp_loose found before, and the apply's error.
            A backend that applies from inside the pod netns runs the guard in the same entry. A pod moving
            between backends: the one it leaves takes its redirection out once the new one's is in."""
            loose = known

            def guard(read: Callable[[], int | None], write: Callable[[int], None]) -> None:
                nonlocal loose
                try:
                    if loose is None:  # recorded before it is changed: a restarted agent restores the original
                        loose = read()
                        records.save(replace(record, tcp_loose=loose))
                    if loose:  # connections opened before enrolment must not be redirected mid-stream
                        write(0)
                except OSError as exc:  # e.g. /proc/sys read-only: the agent's container is not privileged
                    log.warning("cannot set nf_conntrack_tcp_loose=0 in the pod (%s): its connections opened "
                                "before enrolment may be reset (their next packets can be redirected to the "
                                "proxy, which knows nothing of them)", exc, extra=ctx)

            try:
                if isinstance(backend, AppliesInNetns):
                    here = (conntrack.read_loose_here, conntrack.set_loose_here)  # on the applying thread
                    backend.apply_after(target, spec, lambda: guard(*here))
                else:
                    path = target.netns_path
                    guard(lambda: conntrack.read_loose(path), lambda value: conntrack.set_loose(path, value))
                    backend.apply(target, spec)
                Backends.step_aside(leaving, target, backend)
            except (BackendError, PinError, OSError) as exc:
                return loose, exc
            return loose, None

        st.reason = "applying rules"
        fut = pool.submit(job)
        self.jobs[st.uid] = fut
        fut.add_done_callback(functools.partial(self._ended, self._finished, st.uid))

    def _ended(self, queue: deque[tuple[str, Future[Any]]], uid: str, fut: Future[Any]) -> None:
        """A future's callback (any thread): handed to the next step_jobs, and the loop woken; a pass waiting
        in finish_jobs goes on now (the pod enrolled, a CNI ADD waiting for it answered), not at its next
        look. Never waits for the lock (held by another thread: the pass looks again within JOB_POLL)."""
        queue.append((uid, fut))
        self._wake()
        if self.table.lock.acquire(blocking=False):
            try:
                self.table.cond.notify_all()
            finally:
                self.table.lock.release()

    def _finish_apply(self, st: PodState, fut: Future[JobResult], *, notify: bool = True) -> None:
        """The pass that sees a pod's apply done (lock held): `enrolled`, or `failed` and retried."""
        try:
            loose, error = fut.result()
        except Exception as exc:  # a surprise in one pod's job must not stall the others
            log.exception("apply job failed", extra=log_ctx(st, "apply"))
            self._rules_failed(st, exc)
            return
        if st.tcp_loose is None:
            st.tcp_loose = loose  # the original value, whatever the apply did (a retry must not read our 0)
        if error is not None:
            self._rules_failed(st, error)
            return
        st.applied_at = self.table.clock()
        self._moved(st)
        self._enrolled(st, notify=notify)

    def _moved(self, st: PodState) -> None:
        """The pod's apply is in and the backend it left has stepped aside: the move is over (recorded)."""
        if st.leaving:
            log.info("pod moved from the %s to the %s backend", st.leaving, st.backend,
                     extra=log_ctx(st, "backend-switch"))
            st.leaving = ""
            self.table.save_record(st)

    def _rules_failed(self, st: PodState, exc: Exception) -> None:
        self.table.fail(st, f"rules: {exc}")
        try:
            self.hub.remove(st.uid)
        except Exception:  # noqa: S110 - the retry re-sends anyway
            pass

    def wait_job(self, uid: str) -> None:
        """A pod being removed: let its running apply end first (lock held; the job never takes it)."""
        fut = self.jobs.pop(uid, None)
        if fut is None:
            return
        try:
            fut.result(timeout=JOB_WAIT)
        except Exception as exc:  # the removal takes out whatever went in
            log.info("apply ended before the removal: %s", exc, extra={"uid": uid, "step": "unenrol"})

    def _enrolled(self, st: PodState, *, notify: bool = True) -> None:
        st.rules_in = True
        st.state = ENROLLED
        st.moving_from = ""
        st.enrolled_at = time.time()
        st.reason = ""
        st.attempts = 0
        self.table.metrics.enrolled()
        log.info("pod enrolled", extra=log_ctx(st, "enrolled"))
        if notify:
            self.table.notify()

    def unenrol(self, uid: str, why: str) -> bool:
        """Rules out (conntrack setting restored), proxy told, pin released, record deleted. False (and
        the pod `failed`, retried) when the rules could not be removed."""
        st = self.table.get(uid, AMBIENT)
        if st is None:
            return True
        self.wait_job(uid)
        try:
            if st.inode and self.table.pins.inode(uid) == st.inode:
                target = self.netns.target(st)
                self.backends.of(st).remove(target)
                if (leaving := self.backends.leaving(st)) is not None:  # removed in the middle of a move
                    leaving.remove(target)
                if st.tcp_loose:
                    self._restore_loose(st, target.netns_path)
        except (BackendError, PinError, OSError) as exc:
            self.table.fail(st, f"rule removal: {exc}")
            return False
        try:
            self.hub.remove(uid)
        except Exception as exc:
            log.warning("proxy hub remove failed: %s", exc, extra=log_ctx(st, "proxy-remove"))
        self.table.forget(st, f"pod removed ({why})", "removed")
        return True

    def _restore_loose(self, st: PodState, netns_path: str) -> None:
        """The pod's nf_conntrack_tcp_loose back to what enrolment found; a refusal (e.g. /proc/sys read-only
        in an agent that is not privileged, which then could not set it either) does not hold the removal."""
        try:
            self.conntrack.set_loose(netns_path, st.tcp_loose or 0)
        except OSError as exc:
            log.warning("cannot restore nf_conntrack_tcp_loose=%s in the pod (%s)", st.tcp_loose, exc,
                        extra=log_ctx(st, "conntrack-restore"))

    def release_all(self, why: str) -> list[tuple[str, str]]:
        """Lock held, the loop stopped: every ambient pod unenrolled as when its label is removed (rules
        out, proxy told, pin and record gone). The (namespace, name) of each pod released; a pod whose
        rules could not be removed keeps them (logged)."""
        released: list[tuple[str, str]] = []
        for st in list(self.table.of_mode(AMBIENT)):
            if self.unenrol(st.uid, why):
                released.append((st.namespace, st.name))
            else:
                log.warning("pod not released: %s", st.reason, extra=log_ctx(st, "release"))
        return released

    def switch_backends(self) -> None:
        """Move enrolled pods whose backend would be chosen differently now (the node proxy's cgroup became
        known, or the eBPF programs compiled: pods on the iptables fallback go to eBPF), as
        `Backends.settle` says. Their applies run one at a time on a pool of their own, collected by later
        passes as enrolments' are (new pods do not wait for a wave of moves); the proxy keeps serving the
        pods meanwhile."""
        for st in self.table.of_mode(AMBIENT):
            if st.state != ENROLLED or not st.backend or self.backends.choose(st).name == st.backend:
                continue  # (an enrolled pod has no apply job: its job was collected first)
            try:
                self.backends.settle(st)
                self.table.save_record(st)
                target = self.netns.target(st)
            except (BackendError, PinError, OSError) as exc:
                st.rules_in = False
                self.table.fail(st, f"backend switch: {exc}")  # retried like any failed enrolment
                continue
            st.state = PENDING  # not drift-checked while its apply runs
            self._submit(st, target, self.backends.of(st), move=True)
            st.reason = f"moving to the {st.backend} backend"
