"""The agent's Prometheus metrics, in their own registry (no process-global state)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STATES = ("enrolled", "pending", "failed")


class AgentMetrics:
    def __init__(self, proxy_connected: Callable[[], bool] | None = None) -> None:
        self.registry = CollectorRegistry()
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
        if proxy_connected is not None:
            self.proxy_connected.set_function(lambda: 1.0 if proxy_connected() else 0.0)
        for state in STATES:
            self.pods.labels(state=state).set(0)

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
