"""The agent's /metrics also carries the process collector's `process_*` series and headrace_build_info."""

from __future__ import annotations

import platform

from node_agent.serve.metrics import AgentMetrics, build_version
from prometheus_client import generate_latest


def test_process_and_build_info_metrics() -> None:
    text = generate_latest(AgentMetrics().registry).decode()
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds"):
        assert f"\n{name} " in text, name
    assert build_version() == "0.1.0"
    assert f'headrace_build_info{{python="{platform.python_version()}",version="0.1.0"}} 1.0' in text


def test_plugin_admission_counters_are_exported() -> None:
    from node_agent.serve.cni_admission import Admission, Refusal

    adm = Admission(max_reading=1, max_handling=1, per_peer=1)
    m = AgentMetrics()
    m.watch_plugin_admission(adm.counts)
    first, _ = adm.admit(("pid", 10), 0.0)
    second, evicted = adm.admit(("pid", 11), 1.0)  # the only reading slot: the first reader is evicted
    assert evicted == [first] and not isinstance(second, Refusal)
    assert adm.start_handling(second) is None
    assert isinstance(adm.admit(("pid", 11), 1.5)[0], Refusal)  # pid 11 holds its one connection
    third, _ = adm.admit(("pid", 12), 2.0)
    assert not isinstance(third, Refusal) and isinstance(adm.start_handling(third), Refusal)  # busy
    adm.admit(("pid", 13), 3.0)
    adm.timed_out()

    def value(name: str, **labels: str) -> float:
        got = m.registry.get_sample_value(name, labels)
        assert got is not None, (name, labels)
        return float(got)

    counts = adm.counts()
    assert counts["evictions"] == 1
    assert value("headrace_agent_plugin_requests_refused_total", reason="evicted") == 1
    assert value("headrace_agent_plugin_requests_refused_total", reason="busy") == 1
    assert value("headrace_agent_plugin_requests_refused_total", reason="deadline") == 1
    assert value("headrace_agent_plugin_requests_refused_total", reason="peer_limit") == 1
    assert value("headrace_agent_plugin_connections", phase="handling") == 1
    assert value("headrace_agent_plugin_connections", phase="reading") == 1
