from __future__ import annotations

import errno
import logging
import socket
import urllib.error
import urllib.request

import pytest
from node_agent.serve import health
from node_agent.serve.health import HealthServer
from node_agent.serve.metrics import AgentMetrics


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_healthz_readyz() -> None:
    connected = [False]
    m = AgentMetrics(lambda: connected[0])
    ready = [False]
    srv = HealthServer(
        "127.0.0.1",
        0,
        m.registry,
        lambda: (True, "ok"),
        lambda: (ready[0], "ready" if ready[0] else "pod source not synced yet"),
    )
    srv.start()
    base = f"http://127.0.0.1:{srv.port}"
    try:
        m.enrolled()
        m.failed("netns not found")
        m.drift_repaired()
        m.reconcile_took(0.01)
        m.pod_states({"enrolled": 3, "failed": 1})
        code, text = get(base + "/metrics")
        assert code == 200
        assert "headrace_agent_enrolments_total 1.0" in text
        assert 'headrace_agent_enrolment_failures_total{reason="netns not found"} 1.0' in text
        assert "headrace_agent_drift_repairs_total 1.0" in text
        assert "headrace_agent_reconcile_duration_seconds_count 1.0" in text
        assert 'headrace_agent_pods{state="enrolled"} 3.0' in text
        assert "headrace_agent_proxy_connected 0.0" in text
        connected[0] = True
        assert "headrace_agent_proxy_connected 1.0" in get(base + "/metrics")[1]
        assert get(base + "/healthz") == (200, "ok\n")
        assert get(base + "/readyz")[0] == 503
        ready[0] = True
        assert get(base + "/readyz") == (200, "ready\n")
        assert get(base + "/nope")[0] == 404
    finally:
        srv.stop()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _server(host: str) -> HealthServer:
    m = AgentMetrics(lambda: True)
    return HealthServer(host, 0, m.registry, lambda: (True, "ok"), lambda: (True, "ready"))


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_any_v6_address_answers_on_ipv4_and_ipv6_loopback() -> None:
    """`::` (the ConfigMap's `[::]:15114`) is one dual-stack socket: the kubelet's probes reach it over
    IPv4 and IPv6 alike. Only the loopback addresses are asked."""
    srv = _server("::")
    srv.start()
    try:
        assert srv.dual_stack
        assert get(f"http://127.0.0.1:{srv.port}/healthz") == (200, "ok\n")
        assert get(f"http://[::1]:{srv.port}/readyz") == (200, "ready\n")
    finally:
        srv.stop()


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_a_v6_literal_listens_on_ipv6_only() -> None:
    srv = _server("::1")
    srv.start()
    try:
        assert not srv.dual_stack
        assert get(f"http://[::1]:{srv.port}/healthz") == (200, "ok\n")
        with pytest.raises(urllib.error.URLError):
            get(f"http://127.0.0.1:{srv.port}/healthz")
    finally:
        srv.stop()


@pytest.mark.parametrize("code", [errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL])
def test_any_v6_address_falls_back_to_ipv4_without_ipv6(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    """A host with IPv6 disabled refuses the IPv6 socket (boot option: EAFNOSUPPORT) or its bind
    (EADDRNOTAVAIL): the listener is IPv4 0.0.0.0 then, and says so."""

    def refused(self: object) -> None:
        raise OSError(code, "IPv6 off")

    monkeypatch.setattr(health._DualStackServer, "server_bind", refused)
    with caplog.at_level(logging.WARNING, logger="headrace.agent.health"):
        srv = _server("::")
    srv.start()
    try:
        assert not srv.dual_stack and srv.host == "0.0.0.0"
        assert get(f"http://127.0.0.1:{srv.port}/healthz") == (200, "ok\n")
        assert any("IPv4 only" in r.getMessage() for r in caplog.records)
    finally:
        srv.stop()


def test_other_bind_errors_are_not_taken_for_missing_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port in use (or any other refusal) stops the agent's start as before: no silent IPv4 fallback."""

    def in_use(self: object) -> None:
        raise OSError(errno.EADDRINUSE, "Address already in use")

    monkeypatch.setattr(health._DualStackServer, "server_bind", in_use)
    with pytest.raises(OSError) as info:
        _server("::")
    assert info.value.errno == errno.EADDRINUSE
