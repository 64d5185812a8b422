"""Prometheus metrics of the node-proxy transports (gRPC and ZDS), read from the hubs' status().

    registry.register(ProxyProtocolCollector(hub.status))

The gRPC hub's status is the top level of the dict; a ZDS server beside it (HubFanout) sits under "zds".
Each counter carries a `protocol` label:

- headrace_agent_proxy_sessions_total: proxy sessions (gRPC streams, ZDS connections) opened
- headrace_agent_proxy_acks_total / _nacks_total: acks received / of them, error acks
- headrace_agent_proxy_refused_total: sessions refused (version mismatch, a second proxy, no hello...)
- headrace_agent_proxy_ack_timeouts_total: sessions ended because the proxy stopped acking
- headrace_agent_proxy_connections: proxy sessions open now
- headrace_agent_proxy_pending: enrolment/removal operations waiting for the proxy's ack
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

COUNTERS = (
    ("sessions", "headrace_agent_proxy_sessions", "Node proxy sessions opened."),
    ("acks", "headrace_agent_proxy_acks", "Acks received from the node proxy (error acks included)."),
    ("nacks", "headrace_agent_proxy_nacks", "Error acks received from the node proxy."),
    ("refused", "headrace_agent_proxy_refused", "Node proxy sessions refused."),
    ("ack_timeouts", "headrace_agent_proxy_ack_timeouts",
     "Node proxy sessions ended because a message stayed unacked past the deadline."),
)


def per_protocol(status: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """{"grpc": ..., "zds": ...} from a hub's (or a fan-out's) status dict."""
    out: dict[str, Mapping[str, Any]] = {"grpc": status}
    zds = status.get("zds")
    if isinstance(zds, Mapping):
        out["zds"] = zds
    return out


def connections(status: Mapping[str, Any]) -> int:
    if "connections" in status:
        return int(status["connections"])
    return 1 if status.get("connected") else 0


class ProxyProtocolCollector:
    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        parts = per_protocol(self.status())
        for key, name, doc in COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["protocol"])
            for protocol, st in parts.items():
                if key in st:
                    family.add_metric([protocol], float(st[key]))
            yield family
        open_now = GaugeMetricFamily("headrace_agent_proxy_connections", "Node proxy sessions open now.",
                                     labels=["protocol"])
        pending = GaugeMetricFamily("headrace_agent_proxy_pending",
                                    "Operations waiting for the node proxy's ack.", labels=["protocol"])
        for protocol, st in parts.items():
            open_now.add_metric([protocol], float(connections(st)))
            pending.add_metric([protocol], float(st.get("pending", 0)))
        yield open_now
        yield pending
