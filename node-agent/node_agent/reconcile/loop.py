"""Desired (labels) vs actual (pinned netns, rules, proxy acks): the agent's one reconcile loop.

Level-triggered: every pass reads the whole PodStore and converges. Wake-ups come from the pod sources,
CNI plugin events, proxy acks and timers. The Reconciler owns the lifecycle, the pass and the answers to
the plugin; the work is done by small collaborators sharing one state table (table.PodTable, every pod
keyed by uid, ambient or sidecar) and its lock:

  enrol.AmbientEnrolment   ambient pods: enrolment (netns pinned, proxy acked, then rules) and removal
  sidecar.SidecarPods      sidecar pods the plugin hands over; in-place repair of boot-race sidecar pods
  plugin_sidecars          sidecar pods the plugin redirected on its own, taken over for the drift check
  drift.DriftCheck         read back every pod's redirection and repair it
  adoption.Adoption        after a restart: records and pins a previous agent left
  choice.Backends          which backend holds a pod; moves between backends
  pod_netns.PodNetns       a pod's netns located, pinned and verified; its cgroup
  status                   the `headrace status` rows

The reconciler is the one writer of pod rules: the boot-race monitor asks it (repair_sidecar).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from cni.contract.events import RULES_REMOVED
from cni.contract.kube_objects import Pod
from cni.contract.spec import AmbientSpec, SidecarSpec
from node_agent.backends.base import BackendError, PodTarget, RedirectBackend
from node_agent.backends.plugin_rules import writes_like_plugin
from node_agent.netns import conntrack as conntrack_guard
from node_agent.netns import finder as netns_finder
from node_agent.netns.finder import NetnsLocation
from node_agent.netns.pin import PinError
from node_agent.reconcile.adoption import Adoption
from node_agent.reconcile.choice import Backends
from node_agent.reconcile.drift import DriftCheck
from node_agent.reconcile.enrol import AmbientEnrolment
from node_agent.reconcile.gate import AdoptionGate
from node_agent.reconcile.plugin_sidecars import PluginSidecars
from node_agent.reconcile.pod_netns import PodNetns
from node_agent.reconcile.records import RecordStore
from node_agent.reconcile.sidecar import SidecarPods
from node_agent.reconcile.state import (
    AMBIENT,
    ENROLLED,
    FAILED,
    NONE,
    PENDING,
    SIDECAR,
    CniHint,
    Conntrack,
    Hub,
    Metrics,
    NoMetrics,
    Outcome,
    Pins,
    PodState,
    RepairResult,
    same_ips,
    shown_state,
    with_add_ips,
)
from node_agent.reconcile.status import StatusBoard, proxy_state, with_proxy
from node_agent.reconcile.table import PodTable
from node_agent.sources.desired import Desired, desired_pods
from node_agent.sources.store import PodStore

log = logging.getLogger("headrace.agent.reconcile")

IDLE_MAX = 5.0  # the longest the loop sleeps with nothing due (every pod enrolled, none polled)
ACKED_EVERY = 8  # a pass collects finished applies and starts acked ones after every this many pods


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
        drift_interval: float = 1.0,
        drift_backstop: float = 120.0,
        drift_events: bool = True,
        node_rules_announce: bool = True,
        hint_ttl: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        adoption_gate: AdoptionGate | None = None,
    ) -> None:
        """fallback: on an eBPF node, the backend (iptables) for pods the node's backend declines; with
        cgroup_fallback (`auto`) also for pods whose cgroup is unknown. backend_factory builds a backend
        this node no longer uses, to clear a pod recorded with it. node_rules_announce: node_rules writes
        nf_tables (its changes are announced; False: iptables-legacy, polled)."""
        self.store = store
        self.exclude_namespaces = exclude_namespaces
        self.hint_ttl = hint_ttl
        self._node_rules = node_rules
        self.metrics: Metrics = metrics or NoMetrics()
        self.table = PodTable(pins, records, self.metrics, clock)
        self.netns = PodNetns(pins, scan or netns_finder.scan, find_by_ips or netns_finder.IpMatcher().find,
                              read_ips or netns_finder.read_netns_ips, needs_cgroup=backend.needs_cgroup)
        self.backends = Backends(backend, self.netns, fallback=fallback, cgroup_fallback=cgroup_fallback,
                                 factory=backend_factory)
        ct: Conntrack = conntrack if conntrack is not None else conntrack_guard
        self.drift = DriftCheck(self.table, self.netns, self.backends, interval=drift_interval,
                                remove_sidecar=lambda uid: self.sidecars.remove(uid), backstop=drift_backstop,
                                events=drift_events, node_announces=node_rules_announce, wake=self.wake)
        self.enrolment = AmbientEnrolment(self.table, self.netns, self.backends, hub, ct, spec or AmbientSpec(),
                                          node_name=node_name, wake=self._acked, verify_soon=self.drift.verify_soon)
        self.sidecars = SidecarPods(self.table, self.netns, self.backends, store, ct,
                                    unenrol_ambient=self.enrolment.unenrol)
        self.plugin_sidecars = PluginSidecars(self.table, self.netns, self.backends)
        self.adoption = Adoption(self.table, self.backends, self.enrolment, adoption_gate)
        self._wake = threading.Event()
        self._urgent = threading.Event()  # a CNI request waits for a converge step
        self._rechoose = False  # the node backend's conditions changed: move pods whose choice differs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.others: dict[str, Desired] = {}  # pods of the source that are not ambient, for status
        self.hints: dict[str, CniHint] = {}
        self.tombstones: set[str] = set()
        self.shown: set[str] = set()  # the pods the source showed at the last pass (a CNI hint no longer stands in)
        self._node_ips: list[str] | None = None
        self.passes = 0
        self.synced_passes = 0  # passes on a source that had listed everything (before: pods of unknown mode)
        self.converges = 0
        self.last_pass = 0.0
        self._hub = hub
        self.board = StatusBoard()
        self.table.on_change = self._publish_status
        store.subscribe(self.wake)

    @property
    def pods(self) -> dict[str, PodState]:
        """The state table: every pod held, by uid."""
        return self.table.pods

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
        self.enrolment.close()
        self.drift.close()

    def release_ambient(self, why: str) -> list[tuple[str, str]]:
        """The agent leaves the node for good (after `stop`): every ambient pod released (`release_all`)."""
        with self.table.lock:
            return self.enrolment.release_all(why)

    def close_backends(self) -> None:
        """Agent shutdown: let backends release node resources they hold (pods keep their redirection)."""
        self.backends.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self.table.lock:
                idle = self._idle_timeout()
            self._wake.wait(timeout=idle)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.reconcile()
            except Exception:
                log.exception("reconcile pass failed", extra={"step": "reconcile"})

    def _idle_timeout(self) -> float:
        """How long the loop may sleep when nothing wakes it (lock held): until the next drift pass, a failed
        pod's retry; 1 s while a pod is on its way (pending), a CNI hint is held, the source has not listed
        yet or a sidecar pod is not held yet; never more than IDLE_MAX (the level-triggered pass runs anyway)."""
        now = self.table.clock()
        wait = min(self.drift.next_due(now), IDLE_MAX)
        if not self.store.synced or self.hints or self._rechoose or any(
                d.mode == "sidecar" and uid not in self.table.pods for uid, d in self.others.items()):
            wait = min(wait, 1.0)  # including sidecar pods the plugin may have redirected: looked at soon
        for st in self.table.pods.values():
            if st.state == FAILED:
                wait = min(wait, st.retry_at - now)
            elif st.state != ENROLLED:
                wait = min(wait, 1.0)
        return max(0.0, wait)

    def adopt(self) -> None:
        """Take over what a previous agent left: records and pins."""
        with self.table.lock:
            self.adoption.adopt()
            self.table.notify()
        self.wake()

    # ---- the pass ----------------------------------------------------------------------------------
    def reconcile(self) -> None:
        """One pass: converge every pod on the desired state; every drift interval also re-check each
        pod's redirection. The drift check takes the lock one pod at a time, and a CNI request that
        arrives meanwhile gets a converge step before the next pod, so it never waits for a whole pass."""
        started = time.perf_counter()
        with self.table.lock:
            synced = self.store.synced  # then the converge's snapshot is too
            now = self.table.clock()
            self._converge_all(now)
            if self._rechoose:
                self._rechoose = False
                self.enrolment.switch_backends()
            due = self.drift.take_due(now)
            plugin_pods = self.plugin_sidecars.candidates(self.others, now) if self.store.synced else []
        if plugin_pods:
            self.plugin_sidecars.look(plugin_pods)
        if due is not None:
            self.drift.run(self._stop.is_set, self._serve_waiting, due)
        self.drift.sync_watches()
        with self.table.lock:
            self._sync_node_rules(force=due is not None and due.node)
            counts: dict[str, int] = {}
            for st in self.table.of_mode(AMBIENT):
                shown = shown_state(st)
                counts[shown] = counts.get(shown, 0) + 1
            self.metrics.pod_states(counts)
            self.passes += 1
            self.synced_passes += synced
            self.last_pass = time.time()
            self.table.notify()
        self.metrics.reconcile_took(time.perf_counter() - started)

    def rechoose_backends(self) -> None:
        """Ask the next pass to move enrolled pods whose backend would be chosen differently now (e.g.
        the node proxy's cgroup became known: ambient pods on the iptables fallback go to eBPF)."""
        with self.table.lock:
            self._rechoose = True
        self.wake()

    def _acked(self) -> None:
        """The proxy acked a pod: its next step is taken by the next pass, or between two pods of a running
        drift pass (a long read-back, e.g. after a restart, does not hold enrolments back)."""
        self._urgent.set()
        self._wake.set()

    def _serve_waiting(self) -> None:
        if self._urgent.is_set():  # a CNI request or a proxy ack waits: serve it before the next pod
            self._converge_all(self.table.clock())

    def _converge_all(self, now: float) -> None:
        """Bring every pod to its desired state (lock held). Counts in `converges` (CNI waiters use it)."""
        self._urgent.clear()
        snap = self.store.snapshot()
        desired = desired_pods(snap, self.exclude_namespaces)
        for uid, hint in list(self.hints.items()):
            if hint.expires < now:
                del self.hints[uid]
        want: dict[str, Pod] = {}
        others: dict[str, Desired] = {}
        for uid, d in desired.items():
            if uid in self.tombstones:
                continue
            if d.mode == "ambient":
                added = self.hints.get(uid)
                want[uid] = added.ips_for(d.pod) if added is not None else with_add_ips(self.table.pods.get(uid), d.pod)
            else:
                others[uid] = d
        for uid, hint in self.hints.items():
            hint.shown = hint.shown or uid in desired  # once the source has the pod, it says if it is there
            # a CNI ADD stands in for a pod the source does not show yet
            if not hint.shown and uid not in self.tombstones:
                want[uid] = Pod(uid=uid, namespace=hint.namespace, name=hint.name, ips=hint.ips)
        self.shown = set(desired)
        self.tombstones &= self.shown  # a pod gone from the source needs no tombstone
        self.others = others

        if snap.synced:  # never clean up before the first full list
            for st in self.table.of_mode(AMBIENT):
                if st.uid not in want:
                    self.enrolment.unenrol(st.uid, "not ambient any more" if st.uid in desired else "pod gone")
            for st in self.table.of_mode(SIDECAR):
                if st.uid not in desired:
                    self.sidecars.remove(st.uid)

        scan = self.netns.new_scan()
        for n, (uid, pod) in enumerate(want.items(), 1):
            if n % ACKED_EVERY == 0:
                self.enrolment.step_jobs()  # the pool applies while the later pods are sent
            added = self.hints.get(uid)
            try:
                self.enrolment.converge(uid, pod, added.netns if added is not None else "", now, scan)
            except Exception as exc:  # one pod's surprise must not stall the others
                log.exception("converging pod failed", extra={"uid": uid, "step": "converge"})
                failed = self.table.get(uid, AMBIENT)
                if failed is not None:
                    self.table.fail(failed, f"internal error: {exc}", now)
        self.enrolment.finish_jobs()  # the rules of every pod acked in this pass went in side by side
        self.converges += 1
        self.table.notify()

    def _sync_node_rules(self, force: bool) -> None:
        if self._node_rules is None:
            return
        ips = sorted({ip for st in self.table.of_mode(AMBIENT) if st.state == ENROLLED for ip in st.ips})
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
        """An ambient pod's ADD: answered once the pod is enrolled (netns pinned, proxy acked, rules in),
        failed, or put elsewhere by the pod source; bounded by timeout."""
        clock = self.table.clock
        started = clock()
        deadline = started + timeout
        with self.table.lock:
            converges_at_request = self.converges
            self.tombstones.discard(uid)
            # held while the ADD may wait (up to an hour), and the hint TTL after (the source catches up)
            self.hints[uid] = CniHint(uid, namespace, name, netns, ips, deadline + self.hint_ttl, uid in self.shown)
            held = self.table.get(uid)
            if held is not None and held.mode == SIDECAR:
                self.sidecars.remove(uid)  # now an ambient pod
            elif held is not None and netns:
                try:
                    new_ino = os.stat(netns).st_ino
                except OSError as exc:
                    return Outcome(False, FAILED, f"netns {netns}: {exc.strerror}", retry=False)
                if held.inode and held.inode != new_ino:  # a new sandbox: forget the old one (none: a new pod)
                    self.enrolment.unenrol(uid, "sandbox replaced")
                elif held.state == FAILED:
                    held.retry_at = 0.0
            self._urgent.set()
            self.wake()
            while True:
                st = self.table.get(uid, AMBIENT)
                if st is not None and st.state == ENROLLED and (not ips or same_ips(st.ips, ips)):
                    self.table.bind_add_ips(st, ips)  # this sandbox's own (the pod object may lag)
                    return Outcome(True, ENROLLED)  # with the ADD's IPs (else it is enrolled again with them)
                if st is not None and st.state == FAILED and self.converges > converges_at_request:
                    return Outcome(False, FAILED, st.reason, retry=True)
                other = self.others.get(uid)
                # the source may lag a label change the plugin already saw: give it a moment to agree
                grace_over = clock() - started >= min(5.0, timeout / 2)
                if st is None and other is not None and self.converges > converges_at_request and grace_over:
                    return Outcome(False, NONE, f"the agent's pod source puts this pod in mode "
                                   f"{other.mode!r} ({other.reason})", retry=True)
                left = deadline - clock()
                if left <= 0:
                    reason = st.reason if st is not None else "not processed"
                    return Outcome(False, PENDING, f"timed out after {timeout:.0f}s: {reason}", retry=True)
                self.table.cond.wait(min(left, 0.5))

    def cni_sidecar_add(self, uid: str, namespace: str, name: str, netns: str, ips: tuple[str, ...],
                        timeout: float, pod: Pod | None = None) -> Outcome:
        """pod: the Pod object as the caller already has it (its cache or a GET), else waited for in the
        agent's pod source."""
        return self.sidecars.add(uid, namespace, name, netns, ips, timeout, pod)

    def cni_del(self, uid: str, plugin_removes: tuple[str, str] | None = None) -> Outcome:
        """`plugin_removes`: (backend, iptables setting) of the rules the plugin would remove itself after
        this DEL; when a sidecar pod is held on the backend that writes them and its rules come out, the
        answer says so ("rules-removed") and the plugin has nothing left to remove."""
        self.table.wait_hold(uid)  # an ADD answered just before: its hold first, then this removal
        with self.table.lock:
            st = self.table.get(uid)
            self.hints.pop(uid, None)
            if st is None:
                self.backends.remove_unheld(uid)
            elif st.mode == SIDECAR:
                the_plugins = plugin_removes is not None and writes_like_plugin(self.backends.of(st), *plugin_removes)
                removed = self.sidecars.remove(uid)
                self.plugin_sidecars.deleted(uid, self.table.clock())
                if the_plugins and removed:  # the rules the plugin would remove are out
                    return Outcome(True, RULES_REMOVED)
            else:
                self.tombstones.add(uid)
                if not self.enrolment.unenrol(uid, "CNI DEL"):
                    return Outcome(False, FAILED, st.reason or "removal failed")
            return Outcome(True, "removed")

    def cni_check(self, uid: str) -> Outcome:
        with self.table.lock:
            st = self.table.get(uid)
            if st is None or (st.mode == AMBIENT and st.state != ENROLLED):
                return Outcome(False, st.state if st else NONE, "pod is not enrolled", retry=True)
            try:
                problems = self.backends.of(st).check(self.netns.target(st), st.spec)
            except (BackendError, PinError) as exc:
                return Outcome(False, FAILED, str(exc))
            if problems:
                return Outcome(False, FAILED, "; ".join(problems))
            return Outcome(True, "intact")

    # ---- the boot-race monitor's questions ----------------------------------------------------------
    def managed_pods(self) -> frozenset[str]:
        """The pods this reconciler holds (their redirection is its own to write and repair)."""
        with self.table.lock:
            return frozenset(self.table.pods)

    def repair_sidecar(self, target: PodTarget, spec: SidecarSpec) -> RepairResult:
        """Put a boot-race sidecar pod's rules into its running netns (see SidecarPods.repair_in_place)."""
        with self.table.lock:
            self.plugin_sidecars.repaired_in_place.add(target.uid)
        result = self.sidecars.repair_in_place(target, spec)
        if not result.error:  # held from now on: the drift check watches it like every pod
            with self.table.lock:
                other, backend = self.others.get(target.uid), self.backends.named(result.backend)
                if other is not None and backend is not None:
                    self.plugin_sidecars.take_repaired(other.pod, target, backend)
        return result

    # ---- status ----------------------------------------------------------------------------------------
    def _publish_status(self) -> None:
        """A new status snapshot when a row changed (lock held: called on every state change and pass)."""
        self.board.update(self.table.pods.values(), self.others, self.backends.node.name)

    def proxy_state(self) -> str:
        return proxy_state(self._hub.status())

    def status(self) -> list[dict[str, Any]]:
        """The last published rows with the node proxy's session state: never takes the reconcile lock."""
        return with_proxy(self.board.rows(), self.proxy_state())

    def enrolled_without_proxy(self) -> int:
        """Enrolled ambient pods while the node proxy is not connected (their traffic has no listener)."""
        return 0 if self.proxy_state() == "connected" else self.board.enrolled_ambient
