"""Node boot race: pods that started before headrace-cni was chained on the node.

A pod whose sandbox was set up before our conflist entry existed never went through `headrace-cni` ADD.
Ambient pods need nothing extra: the agent enrols running pods by finding their netns (flow 3). Sidecar
pods (annotation `sidecar.istio.io/status`) do: the plugin is what installs their redirection, so such a
pod runs with its app traffic bypassing its sidecar. This monitor (a pass when the pod source changes,
then every `interval` while a pod is pending) finds them and reports them (status
row state/reason, Prometheus), and with `--repair-sidecars=apply` (the default) has the reconciler (the one
writer of pod rules) install the sidecar rules in place; `flag` only reports; `off` disables the monitor.

**Why in place, where Istio deletes the pod.** Istio's repair controller deletes (or labels) such pods
because nothing in Istio could put the rules into a running pod: the CNI plugin only ever runs at sandbox
creation with the runtime's `CNI_NETNS`, and the pod's `istio-validation` init container has already
failed. Here the agent can locate a running pod's netns without the runtime (the /proc + cgroup scan, or
the named-netns IP match), hold it by an fd whose inode is verified before use, and apply exactly the
rules the plugin would have written (same `cni.contract.annotations` spec, same backend code, atomic). The
sidecar (Envoy) is already listening on 15001/15006 in the pod, so new connections go through it at
once; connections opened before keep flowing directly (`nf_conntrack_tcp_loose` is set to 0 first, as
for ambient enrolment, so their next packet is not picked up mid-stream and redirected). No restart, no
lost requests, and no dependency on the workload's controller recreating the pod.

**What counts.** A sidecar pod of the pod source whose netns was found and in which no backend shows
any of our rules (`installed()` of the node backend, its fallback and the iptables backend the plugin
uses), seen so for `grace` seconds (a pod whose ADD is still running is not a victim). Only pods with IPs
in the source are judged: the kubelet reports a pod's IP once its sandbox's network set-up (the whole CNI
chain, ours included) has returned, so a pod without one may still be in its ADD, however slow the chain
before ours is (a victim, running since before the plugin was chained, has its IP). Pods whose rules
are present are left alone: the plugin made them. Pods whose netns cannot be found are not judged, nor
are pods the reconciler already holds (its `managed_pods()`). A repaired pod is held by the reconciler from
then on (drift watched like every pod it holds); it stays reported here as `repaired`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from cni.contract.annotations import sidecar_spec
from cni.contract.errors import CniError
from cni.contract.kube_objects import Pod
from cni.contract.spec import SidecarSpec
from node_agent.backends.base import BackendError, PodRules, PodTarget
from node_agent.netns.finder import NetnsLocation
from node_agent.reconcile.state import RepairResult
from node_agent.sources.desired import desired_pods
from node_agent.sources.store import PodStore

log = logging.getLogger("headrace.agent.boot-race")

RepairMode = Literal["apply", "flag", "off"]
REPAIR_MODES: tuple[str, ...] = ("apply", "flag", "off")

# per-pod verdicts
INTACT = "intact"  # our rules are there (the plugin made them): left alone
SUSPECT = "suspect"  # no rules seen yet; confirmed after the grace period
FLAGGED = "flagged"  # boot-race victim, reported only
REPAIRED = "repaired"  # boot-race victim, rules installed in place by the agent
FAILED = "failed"  # boot-race victim, repair failed (retried with backoff)

BACKSTOP = 60.0  # seconds: a pass at least this often even when nothing changed and nothing is due
REPORTED = (FLAGGED, REPAIRED, FAILED)

Locator = Callable[[Pod, dict[str, Any]], NetnsLocation]


class SidecarRepairer(Protocol):
    """The reconciler, as the monitor asks it (node_agent.reconcile.loop.Reconciler)."""

    def managed_pods(self) -> frozenset[str]:
        """The pods it holds (left to it: never judged here)."""

    def repair_sidecar(self, target: PodTarget, spec: SidecarSpec) -> RepairResult:
        """Put the sidecar rules of spec into the pod's running netns."""


class Metrics(Protocol):
    def detected(self) -> None: ...
    def repaired(self) -> None: ...
    def counts(self, counts: Mapping[str, int]) -> None: ...


class _NoMetrics:
    def detected(self) -> None: ...
    def repaired(self) -> None: ...
    def counts(self, counts: Mapping[str, int]) -> None: ...


class PrometheusBootRaceMetrics:
    """The monitor's metrics, registered in the agent's own registry."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge

        self.detected_total = Counter(
            "headrace_agent_boot_race_detected",
            "Sidecar pods found running without redirection (started before headrace-cni was chained).",
            registry=registry)
        self.repairs_total = Counter(
            "headrace_agent_boot_race_repairs", "Boot-race sidecar pods whose rules the agent installed in place.",
            registry=registry)
        self.pods = Gauge(
            "headrace_agent_boot_race_pods", "Boot-race sidecar pods on this node by state.", ["state"],
            registry=registry)
        for state in REPORTED:
            self.pods.labels(state=state).set(0)

    def detected(self) -> None:
        self.detected_total.inc()

    def repaired(self) -> None:
        self.repairs_total.inc()

    def counts(self, counts: Mapping[str, int]) -> None:
        for state in REPORTED:
            self.pods.labels(state=state).set(counts.get(state, 0))


@dataclass
class Verdict:
    uid: str
    namespace: str
    name: str
    state: str
    reason: str = ""
    inode: int = 0
    netns: str = ""
    backend: str = ""
    first_missing: float = 0.0
    attempts: int = 0
    retry_at: float = 0.0
    checked_at: float = 0.0


def default_locator() -> Locator:
    """The agent's netns finder: /proc + cgroup scan (one scan per pass), else the named-netns IP match."""
    from node_agent.netns import finder as netns_finder

    matcher = netns_finder.IpMatcher()

    def locate(pod: Pod, cache: dict[str, Any]) -> NetnsLocation:
        if "scan" not in cache:
            cache["scan"] = netns_finder.scan()
        found = cache["scan"].get(netns_finder.normalise_uid(pod.uid), [])
        if found:
            return netns_finder.pick(pod.uid, found)
        return matcher.find(pod.uid, pod.ips)

    return locate


@contextlib.contextmanager
def held_netns(loc: NetnsLocation) -> Iterator[str]:
    """Hold the located netns by an fd and verify its inode: a recycled /proc/PID path is never entered.
    Yields a path (/proc/<agent pid>/fd/N) that tools like nsenter can open while the fd is held."""
    fd = os.open(loc.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_ino != loc.inode:
            raise LookupError(f"netns at {loc.path} changed while locating it (inode mismatch)")
        yield f"/proc/{os.getpid()}/fd/{fd}"
    finally:
        os.close(fd)


class BootRaceMonitor:
    def __init__(
        self,
        store: PodStore,
        *,
        mode: RepairMode,
        check_backends: Iterable[PodRules],
        repairer: SidecarRepairer,
        exclude_namespaces: tuple[str, ...] = ("kube-system",),
        locate: Locator | None = None,
        metrics: Metrics | None = None,
        interval: float = 1.0,
        grace: float = 2.0,
        recheck: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in REPAIR_MODES:
            raise ValueError(f"repair mode must be one of {', '.join(REPAIR_MODES)}, not {mode!r}")
        self.store = store
        self.mode = mode
        self.check_backends = list(check_backends)  # any of them showing our rules: the pod is intact
        self.repairer = repairer
        self.exclude_namespaces = exclude_namespaces
        self._locate = locate or default_locator()
        self.metrics: Metrics = metrics or _NoMetrics()
        self.interval = interval
        self.grace = grace
        self.recheck = recheck  # flagged pods are looked at again this often (rules may have appeared)
        self._clock = clock
        self._lock = threading.Lock()
        self.verdicts: dict[str, Verdict] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()  # the pod source changed
        self._thread: threading.Thread | None = None
        self.passes = 0
        self.next_due: float | None = None  # when a pod needs another look (None: only on a change)

    # ---- life cycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self.mode == "off":
            return
        self._stop.clear()
        self.next_due = self._clock()  # a first pass at once: the source may have listed already
        self.store.subscribe(self._wake.set)
        self._thread = threading.Thread(target=self._run, name="boot-race", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        """A pass when the pod source changed or a pod is due for another look (never more often than
        `interval`); with nothing due, at least every BACKSTOP seconds."""
        while not self._stop.wait(self.interval):
            due = self.next_due
            self._wake.wait(BACKSTOP if due is None else max(0.0, due - self._clock()))
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check_once()
            except Exception:
                log.exception("boot-race pass failed", extra={"step": "boot-race"})

    # ---- one pass ------------------------------------------------------------------------------------
    def check_once(self) -> None:
        snap = self.store.snapshot()
        now = self._clock()
        if not snap.synced:
            self.next_due = now + self.interval
            return
        skip = self.repairer.managed_pods()
        desired = desired_pods(snap, self.exclude_namespaces)
        sidecars = {uid: d.pod for uid, d in desired.items()
                    if d.mode == "sidecar" and uid not in skip and d.pod.ips}  # no IP yet: its ADD may be running
        with self._lock:  # a repaired pod stays reported once the reconciler holds it (drift watched)
            for uid in [u for u, v in self.verdicts.items()
                        if u not in sidecars and not (v.state == REPAIRED and u in desired)]:
                del self.verdicts[uid]
        cache: dict[str, Any] = {}
        for uid, pod in sidecars.items():
            v = self.verdicts.get(uid)
            if v is not None and not self._due(v, now):
                continue
            try:
                self._judge(pod, v, now, cache)
            except Exception as exc:  # one pod's surprise must not stop the others
                log.exception("boot-race check failed", extra=self._ctx(pod, "boot-race"))
                self._set(Verdict(uid, pod.namespace, pod.name, FAILED, f"boot race: check failed: {exc}",
                                  retry_at=now + 5.0))
        counts: dict[str, int] = {}
        with self._lock:
            for v in self.verdicts.values():
                counts[v.state] = counts.get(v.state, 0) + 1
            dues = [self._due_at(self.verdicts.get(uid), now) for uid in sidecars]
        self.next_due = min((d for d in dues if d is not None), default=None)
        self.metrics.counts(counts)
        self.passes += 1

    def _due_at(self, v: Verdict | None, now: float) -> float | None:
        """When `_due` turns true for this verdict (None: never without a change)."""
        if v is None or v.state == SUSPECT:  # netns not found yet, or within the grace period
            return now + self.interval
        if v.state == FAILED:
            return v.retry_at
        if v.state == FLAGGED:
            return v.checked_at + self.recheck
        return None

    def _due(self, v: Verdict, now: float) -> bool:
        if v.state in (INTACT, REPAIRED):
            return False  # left alone (a new sandbox means a new CNI ADD through the plugin)
        if v.state == SUSPECT:
            return True
        if v.state == FAILED:
            return now >= v.retry_at
        return now - v.checked_at >= self.recheck  # FLAGGED

    def _set(self, v: Verdict) -> None:
        with self._lock:
            self.verdicts[v.uid] = v

    def _has_rules(self, target: PodTarget) -> bool:
        for backend in self.check_backends:
            try:
                if backend.installed(target):
                    return True
            except BackendError as exc:
                log.warning("cannot read %s state: %s", backend.name, exc, extra={"uid": target.uid})
        return False

    def _judge(self, pod: Pod, prev: Verdict | None, now: float, cache: dict[str, Any]) -> None:
        try:
            loc = self._locate(pod, cache)
        except (LookupError, OSError):
            return  # not found (yet): nothing to judge
        with held_netns(loc) as path:
            target = PodTarget(pod.uid, pod.namespace, pod.name, path, loc.inode, pod.ips, loc.cgroup_path)
            if prev is not None and prev.inode and prev.inode != loc.inode:
                prev = None  # another sandbox: judge afresh
            if self._has_rules(target):
                if prev is None or prev.state == SUSPECT:
                    self._set(Verdict(pod.uid, pod.namespace, pod.name, INTACT, "", loc.inode, loc.path))
                    return
                if prev.state in (FLAGGED, FAILED):  # someone else put rules in meanwhile
                    self._set(Verdict(pod.uid, pod.namespace, pod.name, INTACT, "", loc.inode, loc.path))
                    log.info("boot-race pod now has its rules", extra=self._ctx(pod, "boot-race"))
                    return
            if prev is None:
                self._set(Verdict(pod.uid, pod.namespace, pod.name, SUSPECT, "", loc.inode, loc.path,
                                  first_missing=now))
                return
            if prev.state == SUSPECT and now - prev.first_missing < self.grace:
                return
            if prev.state == SUSPECT:
                self.metrics.detected()
                log.warning("sidecar pod runs without redirection (started before headrace-cni was installed)",
                            extra={**self._ctx(pod, "boot-race"), "netns_inode": loc.inode,
                                   "repair": self.mode})
            if self.mode != "apply":
                self._set(Verdict(pod.uid, pod.namespace, pod.name, FLAGGED,
                                  "boot race: started before headrace-cni was installed; sidecar rules "
                                  "missing, not repaired (--repair-sidecars=flag): restart the pod",
                                  loc.inode, loc.path, checked_at=now))
                return
            self._repair(pod, prev, loc, target, now)

    def _repair(self, pod: Pod, prev: Verdict, loc: NetnsLocation, target: PodTarget, now: float) -> None:
        attempts = prev.attempts + 1 if prev.state == FAILED else 1
        try:
            spec = sidecar_spec(pod.annotations)
        except CniError as exc:
            self._set(Verdict(pod.uid, pod.namespace, pod.name, FAILED,
                              f"boot race: sidecar rules missing; annotations invalid, not repaired: {exc}",
                              loc.inode, loc.path, attempts=attempts, retry_at=now + 30.0))
            return
        result = self.repairer.repair_sidecar(target, spec)
        if result.error:
            delay = min(30.0, 0.5 * 2 ** min(attempts, 6))
            self._set(Verdict(pod.uid, pod.namespace, pod.name, FAILED, f"boot race: repair failed: {result.error}",
                              loc.inode, loc.path, result.backend, attempts=attempts, retry_at=now + delay))
            log.error("boot-race repair failed: %s", result.error, extra=self._ctx(pod, "boot-race-repair"))
            return
        self.metrics.repaired()
        self._set(Verdict(pod.uid, pod.namespace, pod.name, REPAIRED,
                          "boot race: started before headrace-cni was installed; sidecar rules installed "
                          "in place by the agent", loc.inode, loc.path, result.backend))
        log.info("boot-race sidecar pod repaired in place", extra={**self._ctx(pod, "boot-race-repair"),
                                                                    "backend": result.backend})

    @staticmethod
    def _ctx(pod: Pod, step: str) -> dict[str, Any]:
        return {"pod": pod.name, "namespace": pod.namespace, "uid": pod.uid, "step": step}

    # ---- status -------------------------------------------------------------------------------------
    def overlay(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Status rows with boot-race pods' state and reason (flagged/failed → failed, repaired → enrolled)."""
        with self._lock:
            verdicts = {u: v for u, v in self.verdicts.items() if v.state in REPORTED}
        if not verdicts:
            return rows
        out = []
        for row in rows:
            v = verdicts.get(str(row.get("uid", "")))
            if v is not None and row.get("mode") == "sidecar":
                row = dict(row)
                held = v.state == REPAIRED and row.get("state") not in (None, "none")  # the reconciler's state
                if not held:
                    row["state"] = "enrolled" if v.state == REPAIRED else "failed"
                    row["reason"] = v.reason
                else:  # a failed drift repair shows its own reason too
                    row["reason"] = v.reason if row["state"] == "enrolled" else f"{v.reason}; {row.get('reason')}"
                row["boot_race"] = v.state
                row["netns"] = row.get("netns") or v.netns
                if v.backend:
                    row["backend"] = v.backend
            out.append(row)
        return out

    def summary(self) -> dict[str, int]:
        with self._lock:
            counts = {s: 0 for s in REPORTED}
            for v in self.verdicts.values():
                if v.state in counts:
                    counts[v.state] += 1
        return counts
