"""The agent's Prometheus metrics, in their own registry (no process-global state)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

if TYPE_CHECKING:
    from node_agent.sources.watch_policy import WatcherFigures

STATES = ("enrolled", "moving", "pending", "failed")
PROXY_CGROUP_SOURCES = ("flag", "peer", "none")


class IptablesCheckCollector:
    """Exports the iptables backend's drift-check counts (node_agent.backends.iptables.iptc_check.CheckStats):
    `headrace_agent_iptables_checks_total{path}` with path `in_process` (python-iptables fingerprint
    unchanged, nothing spawned) or `iptables_save` (the full compare ran), and
    `headrace_agent_iptables_inprocess_read_errors_total` (in-process reads that failed and fell back)."""

    def __init__(self, source: Callable[[], Mapping[str, int]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        counts = self.source()
        checks = CounterMetricFamily(
            "headrace_agent_iptables_checks", "iptables rule checks (drift, adoption) by how they were decided.",
            labels=["path"])
        for path in ("in_process", "iptables_save"):
            checks.add_metric([path], counts.get(path, 0))
        yield checks
        errors = CounterMetricFamily(
            "headrace_agent_iptables_inprocess_read_errors",
            "In-process (python-iptables) reads that failed; the check fell back to iptables-save.")
        errors.add_metric([], counts.get("read_errors", 0))
        yield errors


class OutcomeCounts:
    """Thread-safe counts by outcome, for an OutcomeCollector."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, outcome: str) -> None:
        with self._lock:
            self._counts[outcome] = self._counts.get(outcome, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class OutcomeCollector:
    """Counts by outcome, each outcome exported (0 until it happens):
    - `headrace_agent_plugin_adds_total{outcome}`, the plugin's one-request ADDs (serve/warm_add.py):
      `none`, `sidecar` (rules applied by the agent), `ambient`, `refused` (bad annotations),
      `apply_failed`, `standalone` (left to the plugin's own path), and `lookup` (cache misses looked up);
    - `headrace_agent_plugin_dels_total{outcome}`, the relayed DELs (serve/relayed_del.py): `none`,
      `ambient`, `sidecar` (the agent's part done), `standalone` (left to the plugin's own DEL), and `lookup`
      (cache misses looked up)."""

    def __init__(self, name: str, documentation: str, outcomes: tuple[str, ...],
                 source: Callable[[], Mapping[str, int]]) -> None:
        self.name, self.documentation, self.outcomes, self.source = name, documentation, outcomes, source

    def collect(self) -> Iterator[Metric]:
        counts = self.source()
        family = CounterMetricFamily(self.name, self.documentation, labels=["outcome"])
        for outcome in self.outcomes:
            family.add_metric([outcome], counts.get(outcome, 0))
        yield family


PLUGIN_ADDS = ("none", "sidecar", "ambient", "refused", "apply_failed", "standalone", "lookup")
PLUGIN_DELS = ("none", "ambient", "sidecar", "standalone", "lookup")


class DriftWatchCollector:
    """The drift check's change subscriptions (node_agent.reconcile.drift): `headrace_agent_drift_change_events_total`
    (announcements that made a pod be checked) and `headrace_agent_drift_watched_pods` (pods checked on
    change; an eBPF ambient pod counts too, its programs still polled)."""

    def __init__(self, source: Callable[[], Mapping[str, int]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        counts = self.source()
        events = CounterMetricFamily("headrace_agent_drift_change_events",
                                     "Change announcements (nf_tables, routing) that made the agent check a pod.")
        events.add_metric([], counts.get("events", 0))
        yield events
        watched = GaugeMetricFamily("headrace_agent_drift_watched_pods",
                                    "Pods (and the node netns) checked when their netns announces a change.")
        watched.add_metric([], counts.get("watched", 0))
        yield watched


class EbpfParentCollector:
    """Exports what the eBPF drift check found on pods' ancestor cgroups (node_agent.backends.ebpf.parent_alerts):
    `headrace_agent_ebpf_parent_program_pods` (pods whose ancestor cgroups now hold a program that can override
    the redirect) and `headrace_agent_ebpf_parent_program_alerts_total` (such findings since start)."""

    def __init__(self, source: Callable[[], Mapping[str, int]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        counts = self.source()
        pods = GaugeMetricFamily(
            "headrace_agent_ebpf_parent_program_pods",
            "Pods whose parent cgroups hold an eBPF program that can override the redirect (reported, not removed).")
        pods.add_metric([], counts.get("pods", 0))
        yield pods
        alerts = CounterMetricFamily(
            "headrace_agent_ebpf_parent_program_alerts",
            "eBPF programs found on pods' parent cgroups that can override the redirect (one per pod and program).")
        alerts.add_metric([], counts.get("alerts", 0))
        yield alerts


# admission counter (serve/cni_admission.py Admission.counts) → the `reason` label of the refusals
REFUSAL_REASONS = {"refused_peer": "peer_limit", "refused_busy": "busy", "evictions": "evicted",
                   "deadlines": "deadline"}


class PluginAdmissionCollector:
    """Exports the plugin socket's admission counts: `headrace_agent_plugin_requests_refused_total{reason}`
    (peer_limit: too many connections from one process; busy: every handling slot taken; evicted: a slow
    reader dropped to make room; deadline: the request line not complete in time) and
    `headrace_agent_plugin_connections{phase}` (reading / handling now)."""

    def __init__(self, source: Callable[[], Mapping[str, int]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        counts = self.source()
        refused = CounterMetricFamily(
            "headrace_agent_plugin_requests_refused",
            "Plugin-socket connections answered without being handled, by reason.", labels=["reason"])
        for key, reason in REFUSAL_REASONS.items():
            refused.add_metric([reason], counts.get(key, 0))
        yield refused
        conns = GaugeMetricFamily(
            "headrace_agent_plugin_connections", "Plugin-socket connections now, by phase.", labels=["phase"])
        for phase in ("reading", "handling"):
            conns.add_metric([phase], counts.get(phase, 0))
        yield conns


class KubeWatchCollector:
    """The Kubernetes pod source's watchers (node_agent.sources.kubernetes), label `resource` (`pods`,
    `namespaces`): `headrace_agent_kube_lists_total` (full lists done), `headrace_agent_kube_watches_total`
    (watch requests made), `headrace_agent_kube_watch_errors_total{reason}` (failed lists and watches by
    reason class, node_agent.sources.watch_policy.REASONS) and `headrace_agent_kube_sync_age_seconds`
    (since the last list done or watch event or bookmark received)."""

    def __init__(self, source: Callable[[], Mapping[str, WatcherFigures]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        figures = self.source()
        lists = CounterMetricFamily("headrace_agent_kube_lists", "Full lists of the Kubernetes pod source.",
                                    labels=["resource"])
        watches = CounterMetricFamily("headrace_agent_kube_watches", "Watch requests of the Kubernetes pod source.",
                                      labels=["resource"])
        errors = CounterMetricFamily(
            "headrace_agent_kube_watch_errors", "Failed lists and watches of the Kubernetes pod source, by reason.",
            labels=["resource", "reason"])
        age = GaugeMetricFamily(
            "headrace_agent_kube_sync_age_seconds",
            "Seconds since the watcher last synced: a list done, a watch event or bookmark received.",
            labels=["resource"])
        for resource, f in sorted(figures.items()):
            lists.add_metric([resource], f.lists)
            watches.add_metric([resource], f.watches)
            for reason, count in f.errors.items():
                errors.add_metric([resource, reason], count)
            age.add_metric([resource], f.sync_age)
        yield from (lists, watches, errors, age)


def _ebpf_parent_counts() -> Mapping[str, int]:
    from node_agent.backends.ebpf.parent_alerts import ALERTS

    return ALERTS.snapshot()


def _iptables_check_counts() -> Mapping[str, int]:
    from node_agent.backends.iptables.iptc_check import STATS

    return STATS.snapshot()


def build_version() -> str:
    """The installed headrace distribution's version ("unknown" when run from a bare source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("headrace")
    except PackageNotFoundError:
        return "unknown"


class AgentMetrics:
    def __init__(
        self,
        proxy_connected: Callable[[], bool] | None = None,
        iptables_checks: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ... of the agent
        ProcessCollector(registry=self.registry)
        self.build_info = Gauge(
            "headrace_build_info", "Always 1; the labels say which headrace and Python this agent runs.",
            ["version", "python"], registry=self.registry)
        import platform

        self.build_info.labels(version=build_version(), python=platform.python_version()).set(1)
        # iptables_checks: the drift-check counts to export (default: the process's iptables backend)
        self.registry.register(IptablesCheckCollector(iptables_checks or _iptables_check_counts))
        self.registry.register(EbpfParentCollector(_ebpf_parent_counts))
        self.enrolments = Counter(
            "headrace_agent_enrolments", "Pods enrolled (rules in and proxy acked).", registry=self.registry)
        self.failures = Counter(
            "headrace_agent_enrolment_failures", "Failed enrolment or removal attempts.", ["reason"],
            registry=self.registry)
        self.drift_repairs = Counter(
            "headrace_agent_drift_repairs", "Enrolled pods whose altered rules were repaired.",
            registry=self.registry)
        self.reconcile_duration = Histogram(
            "headrace_agent_reconcile_duration_seconds", "Time of one reconcile pass.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry)
        self.pods = Gauge("headrace_agent_pods", "Ambient pods by state.", ["state"], registry=self.registry)
        self.proxy_connected = Gauge(
            "headrace_agent_proxy_connected", "1 while a node proxy session is open.", registry=self.registry)
        self.proxy_cgroup = Gauge(
            "headrace_agent_proxy_cgroup_source",
            "Where the node proxy's cgroup (ambient over eBPF) comes from: 1 for the current source "
            "(flag: --proxy-cgroup, peer: detected from the proxy's connection, none: unknown or refused).",
            ["source"], registry=self.registry)
        self.proxy_cgroup_source("none")
        self.pods_proxy_lost = Gauge(
            "headrace_agent_pods_proxy_disconnected",
            "Enrolled ambient pods while the node proxy session is down or not synced (redirected traffic "
            "finds no listener).", registry=self.registry)
        if proxy_connected is not None:
            self.proxy_connected.set_function(lambda: 1.0 if proxy_connected() else 0.0)
        for state in STATES:
            self.pods.labels(state=state).set(0)

    def watch_plugin_admission(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """headrace_agent_plugin_requests_refused_total / _plugin_connections from the plugin socket."""
        self.registry.register(PluginAdmissionCollector(counts))

    def watch_pods_without_proxy(self, count: Callable[[], int]) -> None:
        """headrace_agent_pods_proxy_disconnected from the reconciler's published state."""
        self.pods_proxy_lost.set_function(lambda: float(count()))

    def watch_drift_events(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """headrace_agent_drift_change_events_total / _drift_watched_pods from the drift check."""
        self.registry.register(DriftWatchCollector(counts))

    def watch_kube_source(self, figures: Callable[[], Mapping[str, WatcherFigures]]) -> None:
        """headrace_agent_kube_* from the Kubernetes pod source's watchers."""
        self.registry.register(KubeWatchCollector(figures))

    def watch_plugin_adds(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """headrace_agent_plugin_adds_total from the one-request ADD's counts."""
        self.registry.register(OutcomeCollector(
            "headrace_agent_plugin_adds", "The plugin's one-request ADDs, by outcome.", PLUGIN_ADDS, counts))

    def watch_plugin_dels(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """headrace_agent_plugin_dels_total from the relayed DELs' counts."""
        self.registry.register(OutcomeCollector(
            "headrace_agent_plugin_dels", "The plugin's relayed DELs, by outcome.", PLUGIN_DELS, counts))

    def proxy_cgroup_source(self, source: str) -> None:
        for name in PROXY_CGROUP_SOURCES:
            self.proxy_cgroup.labels(source=name).set(1 if name == source else 0)

    # the reconciler's Metrics protocol
    def enrolled(self) -> None:
        self.enrolments.inc()

    def failed(self, reason: str) -> None:
        self.failures.labels(reason=reason or "unknown").inc()

    def drift_repaired(self) -> None:
        self.drift_repairs.inc()

    def reconcile_took(self, seconds: float) -> None:
        self.reconcile_duration.observe(seconds)

    def pod_states(self, counts: Mapping[str, int]) -> None:
        for state in STATES:
            self.pods.labels(state=state).set(counts.get(state, 0))
