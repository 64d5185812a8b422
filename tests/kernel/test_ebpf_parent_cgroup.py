"""Programs on a pod's parent cgroups (a test-made hierarchy `headrace-test-*/kubepods/pod<uid>`): a
`cgroup/connect4` program attached to `kubepods` with BPF_F_ALLOW_MULTI runs after ours for the pod's
sockets and writes the original destination back (real TCP shows the bypass). The drift check reports it
(not a repair: it is not ours and stays attached): a log line, the pod's `status` reason, the metrics;
a parent `sock_ops` program (it cannot change where a socket connects) is not reported; once the parent
program is gone, the report clears and traffic goes through the proxy again."""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_agent.backends.base import PodTarget

from cni.contract.spec import SidecarSpec
from tests.kernel.ebpf_fixtures import PodEnv, ebpf_backend, pod_env

pytestmark = [pytest.mark.kernel, pytest.mark.ebpf]

if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)
pytest.importorskip("bcc")

from node_agent.backends.ebpf import bpfsys  # noqa: E402
from node_agent.backends.ebpf.attach import Cgroup  # noqa: E402
from node_agent.backends.ebpf.backend import EbpfBackend  # noqa: E402
from node_agent.backends.ebpf.parent_alerts import ALERTS  # noqa: E402
from node_agent.reconcile.status import StatusBoard  # noqa: E402
from node_agent.serve.metrics import AgentMetrics  # noqa: E402
from node_agent.serve.status_client import state_text  # noqa: E402

SPEC = SidecarSpec(include_inbound_ports=())


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


def _imm(raw: bytes) -> int:
    return int(struct.unpack("<i", raw)[0])


def rewrite_connect4(ip: str, port: int) -> int:
    """A cgroup/connect4 program that writes ip:port into every connect (and allows it)."""
    insns = b"".join([
        _insn(0xB7, dst=2, imm=_imm(socket.inet_aton(ip))), _insn(0x63, dst=1, src=2, off=4),
        _insn(0xB7, dst=2, imm=_imm(struct.pack(">H", port) + b"\0\0")), _insn(0x63, dst=1, src=2, off=24),
        _insn(0xB7, dst=0, imm=1), _insn(0x95),
    ])  # fmt: skip
    return bpfsys.prog_load(bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, insns, "hrtest_parent4",
                            bpfsys.ATTACH_CGROUP_INET4_CONNECT)


def plain_sockops() -> int:
    return bpfsys.prog_load(bpfsys.PROG_TYPE_SOCK_OPS, _insn(0xB7, dst=0, imm=1) + _insn(0x95), "hrtest_psockops",
                            bpfsys.ATTACH_CGROUP_SOCK_OPS)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[PodEnv]:
    yield from pod_env(tmp_path)


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[EbpfBackend]:
    yield from ebpf_backend(tmp_path / "state")


def test_parent_cgroup_program_is_reported_not_removed(env: PodEnv, backend: EbpfBackend,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    kubepods = env.cgroup / "kubepods"
    pod_cg = kubepods / "podparent"
    pod_cg.mkdir(parents=True)
    env.start_server(env.pod_ns, 15001, "proxy", cgroup=pod_cg)
    env.start_server(env.peer_ns, 8080, "server")
    target = PodTarget(**{**env.target().__dict__, "cgroup_path": str(pod_cg)})
    backend.apply(target, SPEC)
    attached: list[tuple[int, int]] = []
    try:
        assert env.connect(env.peer_v4, 8080, cgroup=pod_cg)["reply"]["name"] == "proxy"
        assert backend.check(target, SPEC) == [] and ALERTS.of(target.uid) == ()

        with Cgroup(kubepods) as parent:
            for prog, atype in ((rewrite_connect4(env.peer_v4, 8080), bpfsys.ATTACH_CGROUP_INET4_CONNECT),
                                (plain_sockops(), bpfsys.ATTACH_CGROUP_SOCK_OPS)):
                bpfsys.prog_attach(prog, parent.fd, atype, bpfsys.F_ALLOW_MULTI)
                attached.append((prog, atype))
        connect4_id = bpfsys.prog_info(attached[0][0]).prog_id
        # the bypass: the parent's program runs after ours and sends the connection straight to the server
        assert env.connect(env.peer_v4, 8080, cgroup=pod_cg)["reply"]["name"] == "server"

        with caplog.at_level(logging.WARNING, logger="headrace.backend.ebpf"):
            problems = backend.check(target, SPEC)
        assert problems == []  # not drift of ours: nothing to repair, nothing removed
        found = ALERTS.of(target.uid)
        assert len(found) == 1, found  # the sock_ops program is not reported
        assert f"id {connect4_id} (hrtest_parent4) on parent cgroup {kubepods} at cgroup/connect4" in found[0]
        assert any("can override the redirect" in r.getMessage() and getattr(r, "pod", "") == target.uid
                   for r in caplog.records)
        with Cgroup(kubepods) as parent:
            assert connect4_id in parent.attached(bpfsys.ATTACH_CGROUP_INET4_CONNECT)  # left where it is

        board = StatusBoard()
        board.publish([{"uid": target.uid, "mode": "sidecar", "state": "enrolled", "reason": ""}])
        row = board.rows()[0]
        assert row["alerts"] == list(found) and "can override the redirect" in row["reason"]
        assert state_text(row) == f"enrolled ({found[0]})"  # what `headrace status` prints
        text = _metrics()
        assert "headrace_agent_ebpf_parent_program_pods 1.0" in text
        assert _value(text, "headrace_agent_ebpf_parent_program_alerts_total") >= 1

        backend.check(target, SPEC)  # the same finding again: logged and counted once
        assert _value(_metrics(), "headrace_agent_ebpf_parent_program_alerts_total") == _value(
            text, "headrace_agent_ebpf_parent_program_alerts_total")

        _detach(kubepods, attached)
        assert backend.check(target, SPEC) == [] and ALERTS.of(target.uid) == ()
        assert "alerts" not in board.rows()[0]
        assert env.connect(env.peer_v4, 8080, cgroup=pod_cg)["reply"]["name"] == "proxy"
    finally:
        _detach(kubepods, attached)
        backend.remove(target)
    assert ALERTS.of(target.uid) == ()


def _detach(cg: Path, attached: list[tuple[int, int]]) -> None:
    with Cgroup(cg) as c:
        for prog, atype in attached:
            try:
                c.detach(prog, atype)
            except bpfsys.BpfSysError:
                pass
            os.close(prog)
    attached.clear()


def _metrics() -> str:
    from prometheus_client import generate_latest

    return generate_latest(AgentMetrics().registry).decode()


def _value(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))
