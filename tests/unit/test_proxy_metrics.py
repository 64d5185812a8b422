"""The node-proxy transport metrics, rendered from the hubs' status dicts."""

from __future__ import annotations

from typing import Any

from node_agent.serve.proxy_metrics import ProxyProtocolCollector
from prometheus_client import CollectorRegistry, generate_latest


def render(status: dict[str, Any]) -> str:
    registry = CollectorRegistry()
    registry.register(ProxyProtocolCollector(lambda: status))
    return generate_latest(registry).decode()


def test_grpc_and_zds_side_by_side() -> None:
    text = render({
        "connected": True, "sessions": 3, "acks": 40, "nacks": 1, "refused": 2, "ack_timeouts": 1, "pending": 5,
        "zds": {"connected": True, "connections": 2, "sessions": 4, "acks": 7, "nacks": 0, "refused": 0,
                "pending": 0},
    })
    for line in (
        'headrace_agent_proxy_sessions_total{protocol="grpc"} 3.0',
        'headrace_agent_proxy_sessions_total{protocol="zds"} 4.0',
        'headrace_agent_proxy_acks_total{protocol="grpc"} 40.0',
        'headrace_agent_proxy_nacks_total{protocol="grpc"} 1.0',
        'headrace_agent_proxy_refused_total{protocol="grpc"} 2.0',
        'headrace_agent_proxy_ack_timeouts_total{protocol="grpc"} 1.0',
        'headrace_agent_proxy_connections{protocol="grpc"} 1.0',
        'headrace_agent_proxy_connections{protocol="zds"} 2.0',
        'headrace_agent_proxy_pending{protocol="grpc"} 5.0',
    ):
        assert line in text, line
    assert 'ack_timeouts_total{protocol="zds"}' not in text  # ZDS ends a silent connection itself


def test_grpc_only_when_zds_is_off() -> None:
    text = render({"connected": False, "sessions": 0, "acks": 0, "nacks": 0, "refused": 0, "pending": 2})
    assert 'headrace_agent_proxy_connections{protocol="grpc"} 0.0' in text
    assert 'protocol="zds"' not in text
