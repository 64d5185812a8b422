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
