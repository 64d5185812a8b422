"""What the eBPF drift check reports about pods' parent cgroups: which hooks count, and the per-pod
findings with their counter and log lines (pure)."""

from __future__ import annotations

import logging

import pytest
from node_agent.backends.ebpf import bpfsys, cgroup_programs, parent_progs
from node_agent.backends.ebpf.parent_alerts import ParentAlerts


def test_checked_hooks_are_those_whose_context_ours_writes() -> None:
    sidecar = cgroup_programs.SIDECAR_PROGRAMS + cgroup_programs.TCP_PROGRAMS
    types = parent_progs.checked_types(sidecar)
    assert bpfsys.ATTACH_CGROUP_INET4_CONNECT in types and bpfsys.ATTACH_CGROUP_GETSOCKOPT in types
    assert bpfsys.ATTACH_CGROUP_SOCK_OPS not in types  # cannot change where a socket connects
    assert bpfsys.ATTACH_CGROUP_INET_SOCK_CREATE not in types
    assert bpfsys.ATTACH_CGROUP_UDP4_SENDMSG not in types  # DNS programs not wanted: not checked
    dns = parent_progs.checked_types(cgroup_programs.TCP_PROGRAMS + cgroup_programs.DNS_PROGRAMS)
    assert bpfsys.ATTACH_CGROUP_UDP4_SENDMSG in dns and bpfsys.ATTACH_CGROUP_UDP6_RECVMSG in dns


def test_findings_are_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    a = ParentAlerts()
    with caplog.at_level(logging.INFO, logger="headrace.backend.ebpf"):
        a.update("p1", ["x"])
        a.update("p1", ["x"])  # the same: nothing new
        a.update("p2", ["x", "y"])
        assert a.of("p1") == ("x",) and a.of("p2") == ("x", "y")
        assert a.snapshot() == {"pods": 2, "alerts": 3}
        a.update("p2", [])
        a.clear("p1")
    assert a.snapshot() == {"pods": 0, "alerts": 3} and a.of("p1") == ()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and all(getattr(r, "step", "") == "ebpf-parent-cgroup" for r in warnings)
    assert any("any more" in r.getMessage() and getattr(r, "pod", "") == "p2" for r in caplog.records)
