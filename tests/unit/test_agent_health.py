from __future__ import annotations

import urllib.error
import urllib.request

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
