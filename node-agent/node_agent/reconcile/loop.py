"""Desired (labels) vs actual (pinned netns, rules, proxy acks): the agent's one reconcile loop.

Level-triggered: every pass reads the whole PodStore and converges. Wake-ups come from the pod sources,
CNI plugin events, proxy acks and timers. Enrolment of an ambient pod, in order: locate the netns (the CNI
event's CNI_NETNS, an adopted pin, or a /proc scan), pin it (inode recorded), write the record, tell the
proxy and wait for its ack, then install the rules (so a redirected connection always finds a listener);
the pod is `enrolled` only after both. Removal goes the other way: rules out, proxy told, pin released.

After a restart, records and pins found on disk are adopted (rules already in place are checked, not
re-added; nothing is duplicated since backends are idempotent), pods that left are cleaned up, and every
enrolled workload is sent to the (new) proxy hub, which snapshots them to the proxy. A periodic drift
check repairs altered rules and counts the repair. A pod whose pinned netns is gone and cannot be found
again (node reboot without drain) is `failed` and retried, never reported enrolled.

Sidecar pods the plugin hands over (`backend: ebpf` conflists) get the same care without the proxy: netns
pinned, record with mode `sidecar` and the traffic annotations their spec is rebuilt from, adopted after a
restart without re-applying, drift-checked (same metric), removed on CNI DEL or when the pod leaves.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cni.contract.spec import AmbientSpec
from node_agent.backends.base import BackendError, PodTarget, RedirectBackend, needs_cgroup
from node_agent.netns.finder import NetnsLocation, NetnsNotFound, pick
from node_agent.netns.pin import PinError
from node_agent.protocol.workload import WorkloadInfo
from node_agent.reconcile.records import EnrolRecord, RecordStore
from node_agent.sources.desired import Desired, desired_pods
from node_agent.sources.store import PodRecord, PodStore

log = logging.getLogger("headrace.agent.reconcile")

ENROLLED, PENDING, FAILED, NONE = "enrolled", "pending", "failed", "none"


class Hub(Protocol):
    def upsert(self, w: WorkloadInfo) -> Future[None]: ...
    def remove(self, uid: str) -> Future[None]: ...

    @property
    def connected(self) -> bool: ...


class Pins(Protocol):
    def path(self, uid: str) -> Path: ...
    def inode(self, uid: str) -> int | None: ...
    def pin(self, uid: str, source: str, expected_inode: int) -> str: ...
    def verify(self, uid: str, expected_inode: int) -> str: ...
    def release(self, uid: str) -> None: ...
    def pinned(self) -> dict[str, int]: ...
    def leftovers(self) -> list[str]: ...


class Conntrack(Protocol):
    def read_loose(self, netns_path: str) -> int | None: ...
    def set_loose(self, netns_path: str, value: int) -> None: ...


class Metrics(Protocol):
    def enrolled(self) -> None: ...
    def failed(self, reason: str) -> None: ...
    def drift_repaired(self) -> None: ...
    def reconcile_took(self, seconds: float) -> None: ...
    def pod_states(self, counts: Mapping[str, int]) -> None: ...


class _NoMetrics:
    def enrolled(self) -> None: ...
    def failed(self, reason: str) -> None: ...
    def drift_repaired(self) -> None: ...
    def reconcile_took(self, seconds: float) -> None: ...
    def pod_states(self, counts: Mapping[str, int]) -> None: ...


@dataclass
class CniHint:
    """What a CNI ADD told us about a pod the pod source may not show yet."""

    uid: str
    namespace: str
    name: str
    netns: str
    ips: tuple[str, ...]
    expires: float


@dataclass
class PodState:
    uid: str
    namespace: str
    name: str
    mode: str = "ambient"
    state: str = PENDING
    reason: str = ""
    netns: str = ""
    inode: int = 0
    ips: tuple[str, ...] = ()
    cgroup_path: str | None = None
    attempts: int = 0
    retry_at: float = 0.0
    ack: Future[None] | None = None
    ack_since: float = 0.0
    rules_in: bool = False
    service_account: str = "default"
    tcp_loose: int | None = None  # the pod's nf_conntrack_tcp_loose before we changed it
    backend: str = ""  # the backend that holds (or will hold) this pod's redirection
    enrolled_at: float = 0.0  # wall clock of the last transition to enrolled
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    ok: bool
    state: str
    error: str = ""
    retry: bool = True


class Reconciler:
    def __init__(
        self,
        store: PodStore,
        backend: RedirectBackend,
        hub: Hub,
        pins: Pins,
        records: RecordStore,
        *,
        exclude_namespaces: tuple[str, ...] = ("kube-system",),
        scan: Callable[[], dict[str, list[NetnsLocation]]] | None = None,
        read_ips: Callable[[str], tuple[str, ...]] | None = None,
        find_by_ips: Callable[[str, tuple[str, ...]], NetnsLocation] | None = None,
        conntrack: Conntrack | None = None,
        fallback: RedirectBackend | None = None,
        cgroup_fallback: bool = True,
        backend_factory: Callable[[str], RedirectBackend | None] | None = None,
        node_rules: Callable[[list[str]], None] | None = None,
        metrics: Metrics | None = None,
        spec: AmbientSpec | None = None,
        node_name: str = "",
        drift_interval: float = 2.0,
        hint_ttl: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from node_agent.netns import finder as netns_finder

        self.store = store
        self.backend = backend
        # `auto` on a node where eBPF runs: pods whose cgroup is unknown get the fallback (iptables)
        self.fallback = fallback
        # True (`auto`): the fallback also takes pods whose cgroup is unknown; False (`ebpf`): only pods the
        # node backend itself declines (its fallback_reason(spec)); the others fail closed
        self.cgroup_fallback = cgroup_fallback
        # builds a backend this node no longer uses, to clear a pod recorded with it (backend switch)
        self._backend_factory = backend_factory
        self._retired: dict[str, RedirectBackend | None] = {}
        self.hub = hub
        self.pins = pins
        self.records = records
        self.exclude_namespaces = exclude_namespaces
        self._scan = scan or netns_finder.scan
        self._read_ips = read_ips or netns_finder.read_netns_ips
        self._find_by_ips = find_by_ips or netns_finder.IpMatcher().find
        if conntrack is None:
            from node_agent.netns import conntrack as conntrack_guard

            conntrack = conntrack_guard
        self._conntrack: Conntrack = conntrack
        self._node_rules = node_rules
        self.metrics: Metrics = metrics or _NoMetrics()
        self.spec = spec or AmbientSpec()
        self.node_name = node_name
        self.drift_interval = drift_interval
        self.hint_ttl = hint_ttl
        self._clock = clock
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._urgent = threading.Event()  # a CNI request waits for a converge step
        self._rechoose = False  # the node backend's conditions changed: move pods whose choice differs
        self._verify_soon = False  # pods were enrolled on rules found in place: run the drift pass now
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pods: dict[str, PodState] = {}
        self.others: dict[str, Desired] = {}  # non-ambient pods, for status
        self.hints: dict[str, CniHint] = {}
        self.sidecars: dict[str, PodState] = {}  # sidecar pods handed over by the plugin (backend ebpf)
        self.sidecar_specs: dict[str, Any] = {}
        self.tombstones: set[str] = set()
        self._node_ips: list[str] | None = None
        self._last_drift = 0.0
        self.passes = 0
        self.converges = 0
        self.last_pass = 0.0
        store.subscribe(self.wake)

    # ---- lifecycle -------------------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self.adopt()
        self._thread = threading.Thread(target=self._run, name="reconcile", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop. Rules, pins and records stay: pods keep their redirection."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=min(self.drift_interval, 1.0))
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.reconcile()
            except Exception:
                log.exception("reconcile pass failed", extra={"step": "reconcile"})

    # ---- adoption after restart --------------------------------------------------------------------
    def adopt(self) -> None:
        """Take over what a previous agent left: records and pins."""
        with self._lock:
            records = self.records.load_all()
            pinned = self.pins.pinned()
            for uid, rec in records.items():
                if rec.mode == "sidecar":
                    self._adopt_sidecar(rec, pinned.get(uid))
                    continue
                st = PodState(uid, rec.namespace, rec.name, ips=rec.ips, inode=rec.netns_inode,
                              tcp_loose=rec.tcp_loose, backend=rec.backend, cgroup_path=rec.cgroup_path)
                got = pinned.get(uid)
                if got == rec.netns_inode:
                    st.netns = str(self.pins.path(uid))
                    st.rules_in = True  # checked before use; never re-added blindly
                    st.reason = "adopted after restart"
                    st.extra["adopted"] = True
                else:
                    st.inode = 0
                    st.state = FAILED
                    st.reason = "pinned netns gone (node reboot?)"
                    self.records.delete(uid)
                    if got is not None:
                        self.pins.release(uid)
                self.pods[uid] = st
            for uid, ino in pinned.items():
                if uid not in self.pods and uid not in self.sidecars:
                    st = PodState(uid, "", "", inode=ino, netns=str(self.pins.path(uid)),
                                  reason="adopted pin without record")
                    st.extra["adopted"] = True
                    self.pods[uid] = st
            for uid in self.pins.leftovers():
                self.pins.release(uid)
        self.wake()

    def _adopt_sidecar(self, rec: EnrolRecord, pinned_inode: int | None) -> None:
        """A sidecar pod a previous agent redirected: keep it (rules checked by the drift check, not
        re-applied), or, when its netns is gone, clear what is left of it."""
        from cni.contract.annotations import sidecar_spec
        from cni.contract.errors import CniError

        uid = rec.uid
        st = PodState(uid, rec.namespace, rec.name, mode="sidecar", ips=rec.ips, inode=rec.netns_inode,
                      backend=rec.backend, cgroup_path=rec.cgroup_path)
        try:
            spec = sidecar_spec(dict(rec.annotations))
        except CniError as exc:  # the record was valid when written; never guess a spec
            log.warning("sidecar record unusable: %s", exc, extra=self._ctx(st, "adopt-sidecar"))
            spec = None
        if pinned_inode == rec.netns_inode and spec is not None:
            st.netns = str(self.pins.path(uid))
            st.state, st.rules_in = ENROLLED, True
            st.reason = "adopted after restart"
            st.enrolled_at = time.time()
            self.sidecars[uid] = st
            self.sidecar_specs[uid] = spec
            log.info("sidecar pod adopted", extra=self._ctx(st, "adopt-sidecar"))
            return
        self._remove_unknown_pins(uid)
        if pinned_inode is not None:
            self.pins.release(uid)
        self.records.delete(uid)
        log.info("sidecar record dropped: netns gone", extra=self._ctx(st, "adopt-sidecar"))

    # ---- the pass ----------------------------------------------------------------------------------
    def reconcile(self) -> None:
        """One pass: converge every pod on the desired state; every drift interval also re-check each
        enrolled pod's rules. The drift check takes the lock one pod at a time, and a CNI request that
        arrives meanwhile gets a converge step before the next pod, so it never waits for a whole pass."""
        started = time.perf_counter()
        with self._lock:
            now = self._clock()
            self._converge_all(now)
            if self._rechoose:
                self._rechoose = False
                self._rechoose_all()
            drift_due = now - self._last_drift >= self.drift_interval or self._verify_soon
            if drift_due:
                self._last_drift, self._verify_soon = now, False
        if drift_due:
            self._drift_pass()
        with self._lock:
            self._sync_node_rules(force=drift_due)
            counts: dict[str, int] = {}
            for st in self.pods.values():
                counts[st.state] = counts.get(st.state, 0) + 1
            self.metrics.pod_states(counts)
            self.passes += 1
            self.last_pass = time.time()
            self._cond.notify_all()
        self.metrics.reconcile_took(time.perf_counter() - started)

    def rechoose_backends(self) -> None:
        """Ask the next pass to move enrolled pods whose backend would be chosen differently now (e.g.
        the node proxy's cgroup became known: ambient pods on the iptables fallback go to eBPF)."""
        with self._lock:
            self._rechoose = True
        self.wake()

    def _rechoose_all(self) -> None:
        for st in list(self.pods.values()):
            if st.state != ENROLLED or not st.backend or self._choose(st, self.spec).name == st.backend:
                continue
            old = st.backend
            try:
                self._settle_backend(st)  # the old backend's redirection is removed first
                self._backend_of(st).apply(self._target(st), self.spec)
                st.rules_in = True
                self._save_record(st)
                log.info("pod re-applied on the %s backend (was %s)", st.backend, old,
                         extra=self._ctx(st, "backend-switch"))
            except (BackendError, PinError, OSError) as exc:
                st.state, st.rules_in = PENDING, False
                self._fail(st, f"backend switch: {exc}")  # retried like any failed enrolment

    def _converge_all(self, now: float) -> None:
        """Bring every pod to its desired state (lock held). Counts in `converges` (CNI waiters use it)."""
        self._urgent.clear()
        snap = self.store.snapshot()
        desired = desired_pods(snap, self.exclude_namespaces)
        for uid, hint in list(self.hints.items()):
            if hint.expires < now:
                del self.hints[uid]
        want: dict[str, PodRecord] = {}
        others: dict[str, Desired] = {}
        for uid, d in desired.items():
            if uid in self.tombstones:
                continue
            if d.mode == "ambient":
                added = self.hints.get(uid)
                # a pod object written before its CNI ADD has no IPs yet; the ADD brings them
                want[uid] = d.pod.with_ips(added.ips) if not d.pod.ips and added and added.ips else d.pod
            else:
                others[uid] = d
        for uid, hint in self.hints.items():
            # a CNI ADD stands in for a pod the source does not show yet
            if uid not in desired and uid not in self.tombstones:
                want[uid] = PodRecord(uid=uid, namespace=hint.namespace, name=hint.name, ips=hint.ips)
        self.tombstones &= set(desired)  # a pod gone from the source needs no tombstone
        self.others = others

        for uid in list(self.pods):
            if uid in want:
                continue
            if not snap.synced:
                continue  # never clean up before the first full list
            self._unenrol(uid, "not ambient any more" if uid in desired else "pod gone")

        if snap.synced:
            for uid in [u for u in self.sidecars if u not in desired]:
                self._sidecar_remove(uid)

        scan_cache: dict[str, dict[str, list[NetnsLocation]]] = {}
        for uid, pod in want.items():
            try:
                self._converge(uid, pod, now, scan_cache)
            except Exception as exc:  # one pod's surprise must not stall the others
                log.exception("converging pod failed", extra={"uid": uid, "step": "converge"})
                st = self.pods.get(uid)
                if st is not None:
                    self._fail(st, f"internal error: {exc}", now)
        self.converges += 1
        self._cond.notify_all()

    def _drift_pass(self) -> None:
        """Re-check (and repair) every enrolled pod, ambient then sidecar. The read-back runs outside the
        lock (it only reads the pod's rules); the lock is taken to pick the pod and again to act on what
        was read, after making sure the pod is still the one that was read."""
        todo = [(False, uid) for uid in list(self.pods)] + [(True, uid) for uid in list(self.sidecars)]
        for sidecar, uid in todo:
            if self._stop.is_set():
                return
            with self._lock:
                if self._urgent.is_set():  # a CNI request waits: serve it before the next pod
                    self._converge_all(self._clock())
                job = self._drift_job(sidecar, uid)
            if job is None:
                continue
            st, backend, target, spec = job
            try:
                result: list[str] | BackendError = backend.check(target, spec)
            except BackendError as exc:
                result = exc
            with self._lock:
                table = self.sidecars if sidecar else self.pods
                if table.get(uid) is not st or st.inode != target.netns_inode:
                    continue  # removed or replaced meanwhile: its new state is checked next time
                if sidecar or st.state == ENROLLED:
                    self._drift_repair(st, sidecar, backend, target, spec, result)

    def _converge(self, uid: str, pod: PodRecord, now: float, scan_cache: dict[str, Any]) -> None:
        st = self.pods.get(uid)
        if st is None:
            st = self.pods[uid] = PodState(uid, pod.namespace, pod.name)
        st.namespace, st.name = pod.namespace or st.namespace, pod.name or st.name
        st.service_account = pod.service_account
        if pod.ips and st.ips and set(pod.ips) != set(st.ips) and (st.state == ENROLLED or st.ack is not None):
            # the proxy and the backend (eBPF keeps the pod IPs in its config) must learn the new IPs
            log.info("pod IPs changed (%s -> %s): enrolling again", ",".join(st.ips), ",".join(pod.ips),
                     extra=self._ctx(st, "ips-changed"))
            st.state, st.rules_in, st.ack = PENDING, False, None
        if pod.ips:
            st.ips = pod.ips
        if st.state == ENROLLED:
            return
        if st.state == FAILED and now < st.retry_at:
            return
        if st.ack is not None:
            if not st.ack.done():
                return
            self._after_ack(st)
            return
        self._start_enrol(st, now, scan_cache)

    def _fail(self, st: PodState, reason: str, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        st.state = FAILED
        st.reason = reason
        st.attempts += 1
        st.retry_at = now + min(30.0, 0.5 * (2 ** min(st.attempts, 6)))
        st.ack = None
        self.metrics.failed(reason.split(":")[0][:40])
        log.warning("enrolment failed: %s", reason, extra=self._ctx(st, "enrol-failed"))
        self._cond.notify_all()

    def _ctx(self, st: PodState, step: str) -> dict[str, Any]:
        return {"pod": st.name, "namespace": st.namespace, "uid": st.uid, "netns": st.netns, "step": step}

    def _find_cgroup(self, st: PodState, scan_cache: dict[str, Any]) -> None:
        """The pod's cgroup v2 dir from its processes in the pinned netns (eBPF attaches there)."""
        if st.cgroup_path or not needs_cgroup(self.backend):
            return
        if "scan" not in scan_cache:
            scan_cache["scan"] = self._scan()
        for loc in scan_cache["scan"].get(st.uid, []):
            if loc.inode == st.inode and loc.cgroup_path:
                st.cgroup_path = loc.cgroup_path
                return

    def _locate(self, st: PodState, scan_cache: dict[str, Any]) -> None:
        """Make sure st.netns is a verified pin; raises PinError/LookupError."""
        if st.inode and st.netns:
            try:
                self.pins.verify(st.uid, st.inode)
                self._find_cgroup(st, scan_cache)  # adopted from an agent that did not need it
                return
            except PinError:
                st.netns, st.inode, st.rules_in = "", 0, False
                raise
        hint = self.hints.get(st.uid)
        if hint is not None and hint.netns:
            ino = os.stat(hint.netns).st_ino
            current = self.pins.inode(st.uid)
            if current is not None and current != ino:
                self.pins.release(st.uid)  # a new sandbox for the same pod
            st.netns = self.pins.pin(st.uid, hint.netns, ino)
            st.inode = ino
            if needs_cgroup(self.backend) and not st.cgroup_path:
                # the sandbox's processes (if any) name the pod's cgroup, which eBPF attaches to
                if "scan" not in scan_cache:
                    scan_cache["scan"] = self._scan()
                for loc in scan_cache["scan"].get(st.uid, []):
                    if loc.inode == ino and loc.cgroup_path:
                        st.cgroup_path = loc.cgroup_path
                        break
            return
        if "scan" not in scan_cache:
            scan_cache["scan"] = self._scan()
        try:
            loc = pick(st.uid, scan_cache["scan"].get(st.uid, []))
        except NetnsNotFound:
            if not st.ips:
                raise
            loc = self._find_by_ips(st.uid, st.ips)
        current = self.pins.inode(st.uid)
        if current is not None and current != loc.inode:
            self.pins.release(st.uid)
        st.netns = self.pins.pin(st.uid, loc.path, loc.inode)
        st.inode = loc.inode
        st.cgroup_path = loc.cgroup_path

    def _backend_named(self, name: str) -> RedirectBackend | None:
        for b in (self.backend, self.fallback):
            if b is not None and b.name == name:
                return b
        if name not in self._retired:
            made = None
            if self._backend_factory is not None:
                try:
                    made = self._backend_factory(name)
                except Exception as exc:
                    log.warning("cannot build backend %s: %s", name, exc, extra={"step": "backend"})
            self._retired[name] = made
        return self._retired[name]

    def _choose(self, st: PodState, spec: Any) -> RedirectBackend:
        """The backend a pod should have now: the node's, or the fallback when the node's backend declines
        the spec (fallback_reason) or, with cgroup_fallback, when the pod's cgroup is unknown."""
        if self.fallback is None:
            return self.backend
        reason_fn = getattr(self.backend, "fallback_reason", None)
        reason = reason_fn(spec) if callable(reason_fn) else None
        if reason is None and self.cgroup_fallback and not st.cgroup_path and needs_cgroup(self.backend):
            reason = "the pod's cgroup v2 directory is unknown (no pod process found)"
        if reason is None:
            return self.backend
        if st.extra.get("fallback_reason") != reason:
            st.extra["fallback_reason"] = reason
            log.info("pod uses the %s backend: %s", self.fallback.name, reason,
                     extra={**self._ctx(st, "backend"), "backend": self.fallback.name})
        return self.fallback

    def _backend_of(self, st: PodState) -> RedirectBackend:
        """The pod's backend: the one recorded, else the one chosen now (see _choose)."""
        if st.backend:
            b = self._backend_named(st.backend)
            if b is not None:
                return b
        chosen = self._choose(st, self.spec)
        st.backend = chosen.name
        return chosen

    def _settle_backend(self, st: PodState) -> None:
        """A pod recorded with another backend than the one it should have now (the agent restarted with
        another --backend, or its cgroup became known): clear the old backend's redirection first, so the
        new one is installed alone."""
        chosen = self._choose(st, self.spec)
        if st.backend and st.backend != chosen.name:
            old = self._backend_named(st.backend)
            if old is not None and st.inode:
                target = self._target(st)
                if old.installed(target):
                    old.remove(target)
                    log.info("pod moved from the %s to the %s backend", old.name, chosen.name,
                             extra=self._ctx(st, "backend-switch"))
            st.rules_in = False
        st.backend = chosen.name

    def close_backends(self) -> None:
        """Agent shutdown: let backends release node resources they hold (pods keep their redirection)."""
        for b in (self.backend, self.fallback, *self._retired.values()):
            close = getattr(b, "close", None)
            if callable(close):
                try:
                    close()
                except Exception as exc:
                    log.warning("backend close: %s", exc, extra={"step": "stop"})

    def _target(self, st: PodState) -> PodTarget:
        path = self.pins.verify(st.uid, st.inode)
        return PodTarget(st.uid, st.namespace, st.name, path, st.inode, st.ips, st.cgroup_path)

    def _start_enrol(self, st: PodState, now: float, scan_cache: dict[str, Any]) -> None:
        st.state = PENDING
        try:
            self._locate(st, scan_cache)
        except FileNotFoundError as exc:
            self._fail(st, f"netns not found: {exc}", now)
            return
        except (PinError, LookupError, OSError) as exc:
            self._fail(st, f"netns not found: {exc}", now)
            return
        try:
            self._settle_backend(st)
        except (BackendError, PinError, OSError) as exc:
            self._fail(st, f"backend switch: {exc}", now)
            return
        if not st.ips:
            try:
                st.ips = self._read_ips(st.netns)
            except (OSError, ValueError) as exc:
                log.warning("cannot read pod IPs: %s", exc, extra=self._ctx(st, "read-ips"))
        if not st.ips:
            # not wired yet (its CNI ADD has not run): the proxy identifies workloads by IP, so wait
            st.reason = "waiting for the pod's IPs (CNI ADD or pod status)"
            return
        self._save_record(st)
        w = WorkloadInfo(
            uid=st.uid, name=st.name, namespace=st.namespace, service_account=st.service_account,
            ips=st.ips, netns_path=st.netns, netns_inode=st.inode, node=self.node_name,
        )
        st.reason = "waiting for proxy ack"
        st.ack_since = now
        try:
            fut = self.hub.upsert(w)
        except Exception as exc:
            self._fail(st, f"proxy hub: {exc}", now)
            return
        st.ack = fut
        log.info("workload sent to proxy", extra=self._ctx(st, "proxy-upsert"))
        fut.add_done_callback(lambda _f: self.wake())
        if fut.done():
            self._after_ack(st)

    def _save_record(self, st: PodState) -> None:
        self.records.save(EnrolRecord(st.uid, st.namespace, st.name, st.inode, st.ips, st.backend,
                                      st.tcp_loose, st.cgroup_path))

    def _guard_long_lived(self, st: PodState, netns_path: str) -> None:
        """Connections opened before enrolment must not be redirected mid-stream (conntrack_guard)."""
        try:
            if st.tcp_loose is None:
                st.tcp_loose = self._conntrack.read_loose(netns_path)
                self._save_record(st)
            if st.tcp_loose:
                self._conntrack.set_loose(netns_path, 0)
        except OSError as exc:
            log.warning("cannot protect pre-existing connections: %s", exc, extra=self._ctx(st, "conntrack"))

    def _after_ack(self, st: PodState) -> None:
        fut, st.ack = st.ack, None
        assert fut is not None
        exc = fut.exception()
        if exc is not None:
            self._fail(st, f"proxy refused workload: {exc}")
            return
        try:
            if not st.rules_in:
                self._settle_backend(st)  # the choice may have changed while the proxy was acking
            target = self._target(st)
            backend = self._backend_of(st)
            if st.rules_in:
                # rules found in place (adopted after a restart, or re-sent to a restarted proxy): the
                # drift pass of this same reconcile reads them back, outside the lock, and repairs them
                self._verify_soon = True
            else:
                self._guard_long_lived(st, target.netns_path)
                backend.apply(target, self.spec)
            st.rules_in = True
        except (BackendError, PinError, OSError) as exc:
            self._fail(st, f"rules: {exc}")
            try:
                self.hub.remove(st.uid)
            except Exception:  # noqa: S110 - the retry re-sends anyway
                pass
            return
        st.state = ENROLLED
        st.enrolled_at = time.time()
        st.reason = ""
        st.attempts = 0
        st.extra.pop("adopted", None)
        self.metrics.enrolled()
        log.info("pod enrolled", extra=self._ctx(st, "enrolled"))
        self._cond.notify_all()

    def _unenrol(self, uid: str, why: str) -> bool:
        st = self.pods.get(uid)
        if st is None:
            return True
        try:
            if st.inode and self.pins.inode(uid) == st.inode:
                target = self._target(st)
                self._backend_of(st).remove(target)
                if st.tcp_loose:
                    self._conntrack.set_loose(target.netns_path, st.tcp_loose)
        except (BackendError, PinError, OSError) as exc:
            self._fail(st, f"rule removal: {exc}")
            return False
        try:
            self.hub.remove(uid)
        except Exception as exc:
            log.warning("proxy hub remove failed: %s", exc, extra=self._ctx(st, "proxy-remove"))
        try:
            self.pins.release(uid)
        except OSError as exc:
            log.warning("releasing pin failed: %s", exc, extra=self._ctx(st, "unpin"))
        self.records.delete(uid)
        del self.pods[uid]
        log.info("pod removed (%s)", why, extra=self._ctx(st, "removed"))
        self._cond.notify_all()
        return True

    def _drift_job(self, sidecar: bool, uid: str) -> tuple[PodState, RedirectBackend, PodTarget, Any] | None:
        """What the drift check reads for this pod (lock held); None: nothing to check."""
        st = self.sidecars.get(uid) if sidecar else self.pods.get(uid)
        spec = self.sidecar_specs.get(uid) if sidecar else self.spec
        if st is None or spec is None or (not sidecar and st.state != ENROLLED):
            return None
        try:
            target = self._sidecar_target(st) if sidecar else self._target(st)
            backend = self._backend_of(st)
        except PinError as exc:
            if sidecar:
                log.info("sidecar pod netns gone: %s", exc, extra=self._ctx(st, "drift"))
                self._sidecar_remove(uid)
            else:
                st.state, st.netns, st.inode, st.rules_in = PENDING, "", 0, False
                self._fail(st, f"pinned netns lost: {exc}")
            return None
        except BackendError as exc:
            self._drift_failed(st, sidecar, exc)
            return None
        return st, backend, target, spec

    def _drift_failed(self, st: PodState, sidecar: bool, exc: Exception) -> None:
        if sidecar:
            st.state, st.reason = FAILED, f"drift repair: {exc}"
            log.warning("sidecar drift repair failed: %s", exc, extra=self._ctx(st, "drift"))
        else:
            self._fail(st, f"drift repair: {exc}")

    def _drift_repair(
        self, st: PodState, sidecar: bool, backend: RedirectBackend, target: PodTarget, spec: Any,
        result: list[str] | BackendError,
    ) -> None:
        """Act on what the drift check read: re-apply what is missing or altered. A sidecar pod (its
        state may be `failed` from an earlier repair) is `enrolled` again once intact."""
        try:
            if isinstance(result, BackendError):
                raise result
            if result:
                log.warning("drift found, repairing: %s", "; ".join(result), extra=self._ctx(st, "drift"))
                backend.apply(target, spec)
                self.metrics.drift_repaired()
                if sidecar and st.state != ENROLLED:
                    st.enrolled_at = time.time()
            if sidecar:
                st.state, st.reason = ENROLLED, ""
        except (BackendError, OSError) as exc:
            self._drift_failed(st, sidecar, exc)

    def _sync_node_rules(self, force: bool) -> None:
        if self._node_rules is None:
            return
        ips = sorted({ip for st in self.pods.values() if st.state == ENROLLED for ip in st.ips})
        if ips == self._node_ips and not force:
            return
        try:
            self._node_rules(ips)
            self._node_ips = ips
        except Exception as exc:
            log.warning("node probe rules: %s", exc, extra={"step": "node-rules"})

    # ---- CNI plugin events --------------------------------------------------------------------------
    def cni_add(self, uid: str, namespace: str, name: str, netns: str, ips: tuple[str, ...],
                timeout: float) -> Outcome:
        started = self._clock()
        deadline = started + timeout
        with self._lock:
            converges_at_request = self.converges
            self.tombstones.discard(uid)
            self.hints[uid] = CniHint(uid, namespace, name, netns, ips, self._clock() + self.hint_ttl)
            st = self.pods.get(uid)
            if st is not None and netns:
                try:
                    new_ino = os.stat(netns).st_ino
                except OSError as exc:
                    return Outcome(False, FAILED, f"netns {netns}: {exc.strerror}", retry=False)
                if st.inode != new_ino:  # a new sandbox: forget the old one
                    self._unenrol(uid, "sandbox replaced")
                elif st.state == FAILED:
                    st.retry_at = 0.0
            self._urgent.set()
            self.wake()
            while True:
                st = self.pods.get(uid)
                if st is not None and st.state == ENROLLED:
                    return Outcome(True, ENROLLED)
                if st is not None and st.state == FAILED and self.converges > converges_at_request:
                    return Outcome(False, FAILED, st.reason, retry=True)
                other = self.others.get(uid)
                # the source may lag a label change the plugin already saw: give it a moment to agree
                grace_over = self._clock() - started >= min(5.0, timeout / 2)
                if st is None and other is not None and self.converges > converges_at_request and grace_over:
                    return Outcome(False, NONE, f"the agent's pod source puts this pod in mode "
                                   f"{other.mode!r} ({other.reason})", retry=True)
                left = deadline - self._clock()
                if left <= 0:
                    reason = st.reason if st is not None else "not processed"
                    return Outcome(False, PENDING, f"timed out after {timeout:.0f}s: {reason}", retry=True)
                self._cond.wait(min(left, 0.5))

    def cni_sidecar_add(self, uid: str, namespace: str, name: str, netns: str, ips: tuple[str, ...],
                        timeout: float) -> Outcome:
        """A sidecar pod the plugin hands over (its conflist says backend ebpf): apply the sidecar spec of
        the pod's annotations with the agent's backend, in CNI_NETNS. Like an ambient pod, the netns is
        pinned and an enrolment record (mode sidecar, the traffic annotations) is written, so a restarted
        agent adopts it and the drift check repairs it. Never sent to the node proxy."""
        from cni.contract.annotations import KNOWN, sidecar_spec
        from cni.contract.errors import CniError

        deadline = self._clock() + timeout
        while True:
            pod = self.store.snapshot().pods.get(uid)
            if pod is not None:
                break
            if self._clock() >= deadline:
                return Outcome(False, PENDING, "pod not in the agent's pod source yet", retry=True)
            time.sleep(0.1)
        try:
            spec = sidecar_spec(pod.annotations)
        except CniError as exc:
            return Outcome(False, FAILED, f"sidecar annotations: {exc}", retry=False)
        annotations = tuple(sorted((k, v) for k, v in pod.annotations.items() if k in KNOWN))
        with self._lock:
            try:
                ino = os.stat(netns).st_ino
            except OSError as exc:
                return Outcome(False, FAILED, f"netns {netns}: {exc.strerror}", retry=False)
            old = self.sidecars.get(uid)
            if old is not None and (old.inode != ino or self.sidecar_specs.get(uid) != spec):
                self._sidecar_remove(uid)  # a new sandbox (or new annotations): start over
                old = None
            if uid in self.pods:
                self._unenrol(uid, "now a sidecar pod")
            st = old or PodState(uid, namespace or pod.namespace, name or pod.name, mode="sidecar",
                                 inode=ino, ips=ips or pod.ips)
            try:
                current = self.pins.inode(uid)
                if current is not None and current != ino:
                    self.pins.release(uid)
                st.netns = self.pins.pin(uid, netns, ino)
            except (PinError, OSError) as exc:
                return Outcome(False, FAILED, f"netns pin: {exc}", retry=True)
            if not st.cgroup_path and needs_cgroup(self.backend):
                for loc in self._scan().get(uid, []):
                    if loc.inode == ino and loc.cgroup_path:
                        st.cgroup_path = loc.cgroup_path
                        break
            backend = self._backend_named(st.backend) if st.backend else None
            if backend is None:
                backend = self._choose(st, spec)
            st.backend = backend.name
            target = PodTarget(uid, st.namespace, st.name, st.netns, ino, st.ips, st.cgroup_path)
            self.records.save(EnrolRecord(uid, st.namespace, st.name, ino, st.ips, st.backend, None,
                                          st.cgroup_path, mode="sidecar", annotations=annotations))
            try:
                problems = backend.check(target, spec) if st.rules_in else ["not applied"]
                if problems:
                    backend.apply(target, spec)
            except BackendError as exc:
                st.state, st.reason = FAILED, f"sidecar rules: {exc}"
                self.sidecars[uid], self.sidecar_specs[uid] = st, spec  # DEL or a retry clears it
                return Outcome(False, FAILED, f"sidecar rules: {exc}", retry=True)
            st.state, st.rules_in, st.reason = ENROLLED, True, ""
            st.enrolled_at = time.time()
            self.sidecars[uid] = st
            self.sidecar_specs[uid] = spec
            log.info("sidecar pod redirected", extra=self._ctx(st, "sidecar-enrolled"))
            return Outcome(True, ENROLLED)

    def _sidecar_target(self, st: PodState) -> PodTarget:
        path = self.pins.verify(st.uid, st.inode)
        return PodTarget(st.uid, st.namespace, st.name, path, st.inode, st.ips, st.cgroup_path)

    def _sidecar_remove(self, uid: str) -> None:
        """Redirection out (while the pinned netns still proves it is this pod's), pin released, record
        deleted."""
        st = self.sidecars.pop(uid, None)
        self.sidecar_specs.pop(uid, None)
        if st is None:
            return
        backend = self._backend_of(st)
        try:
            backend.remove(self._sidecar_target(st))
        except PinError:
            try:  # netns gone: what may remain is the pinned eBPF state (found by pod uid)
                if uid in getattr(backend, "pinned_pods", lambda: set())():
                    backend.remove(PodTarget(uid, "", "", ""))
            except (BackendError, OSError) as exc:
                log.warning("sidecar removal: %s", exc, extra=self._ctx(st, "sidecar-remove"))
        except (BackendError, OSError) as exc:
            log.warning("sidecar removal: %s", exc, extra=self._ctx(st, "sidecar-remove"))
        try:
            self.pins.release(uid)
        except OSError as exc:
            log.warning("releasing pin failed: %s", exc, extra=self._ctx(st, "unpin"))
        self.records.delete(uid)
        log.info("sidecar pod removed", extra=self._ctx(st, "sidecar-removed"))

    def _remove_unknown_pins(self, uid: str) -> None:
        """A pod we hold no state for (a sidecar pod redirected by an earlier agent run) may still have
        pinned eBPF state: remove it by its pins (cgroup found by id; TC went with the netns)."""
        for b in (self.backend, self.fallback):
            pinned = getattr(b, "pinned_pods", None)
            if b is None or not callable(pinned):
                continue
            try:
                if uid in pinned():
                    b.remove(PodTarget(uid, "", "", ""))
                    log.info("pinned state of an unknown pod removed", extra={"uid": uid, "step": "cni-del"})
            except (BackendError, OSError) as exc:
                log.warning("removing pinned state: %s", exc, extra={"uid": uid, "step": "cni-del"})

    def cni_del(self, uid: str) -> Outcome:
        with self._lock:
            if uid not in self.sidecars and uid not in self.pods:
                self._remove_unknown_pins(uid)
            self._sidecar_remove(uid)
            self.hints.pop(uid, None)
            if uid in self.pods:
                self.tombstones.add(uid)
                if not self._unenrol(uid, "CNI DEL"):
                    st = self.pods.get(uid)
                    return Outcome(False, FAILED, st.reason if st else "removal failed")
            return Outcome(True, "removed")

    def cni_check(self, uid: str) -> Outcome:
        with self._lock:
            side = self.sidecars.get(uid)
            if side is not None:
                try:
                    target = self._sidecar_target(side)
                    problems = self._backend_of(side).check(target, self.sidecar_specs[uid])
                except (BackendError, PinError) as exc:
                    return Outcome(False, FAILED, str(exc))
                return Outcome(not problems, "intact" if not problems else FAILED, "; ".join(problems))
            st = self.pods.get(uid)
            if st is None or st.state != ENROLLED:
                return Outcome(False, st.state if st else NONE, "pod is not enrolled", retry=True)
            try:
                problems = self._backend_of(st).check(self._target(st), self.spec)
            except (BackendError, PinError) as exc:
                return Outcome(False, FAILED, str(exc))
            if problems:
                return Outcome(False, FAILED, "; ".join(problems))
            return Outcome(True, "intact")

    # ---- status ----------------------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        with self._lock:
            rows: list[dict[str, Any]] = []
            for st in self.pods.values():
                rows.append({
                    "namespace": st.namespace, "name": st.name, "uid": st.uid, "mode": "ambient",
                    "backend": st.backend or self.backend.name, "state": st.state, "reason": st.reason,
                    "netns": st.netns, "ips": list(st.ips),
                    "enrolled_at": round(st.enrolled_at, 3) if st.state == ENROLLED else None,
                })
            for st in self.sidecars.values():
                rows.append({
                    "namespace": st.namespace, "name": st.name, "uid": st.uid, "mode": "sidecar",
                    "backend": st.backend, "state": st.state,
                    "reason": st.reason or "redirected by the agent", "netns": st.netns, "ips": list(st.ips),
                    "enrolled_at": round(st.enrolled_at, 3) if st.state == ENROLLED else None,
                })
            for uid, d in self.others.items():
                if uid in self.pods or uid in self.sidecars:
                    continue
                rows.append({
                    "namespace": d.pod.namespace, "name": d.pod.name, "uid": uid, "mode": d.mode,
                    "backend": "", "state": NONE, "reason": d.reason, "netns": "", "ips": list(d.pod.ips),
                })
            rows.sort(key=lambda r: (r["namespace"], r["name"], r["uid"]))
            return rows
