"""ZDS beside gRPC: the --zds-socket setting, the agent's hub (both transports), the fan-out's first
answer wins (an error fails the pod), and `headrace proxy --protocol zds`."""

from __future__ import annotations

from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from node_agent.agent.config import ConfigError, build_config
from node_agent.agent.daemon import make_hub
from node_agent.protocol.workload import WorkloadInfo
from node_agent.proxy.hub import ProxyHub
from node_agent.proxy.hub_fanout import HubFanout, first_answer
from node_agent.proxy.zds_server import ZdsHub


def test_zds_socket_default_off_and_checked(tmp_path: Path) -> None:
    assert str(build_config(objects_dir=tmp_path).zds_socket) == "/var/run/ztunnel/ztunnel.sock"
    assert build_config(objects_dir=tmp_path, zds_socket="").zds_socket is None
    assert build_config(objects_dir=tmp_path, zds_socket=tmp_path / "z.sock").zds_socket == tmp_path / "z.sock"
    with pytest.raises(ConfigError, match="108 bytes"):
        build_config(objects_dir=tmp_path, zds_socket="/tmp/" + "z" * 120)
    with pytest.raises(ConfigError, match="must differ"):
        build_config(objects_dir=tmp_path, state_dir=tmp_path, zds_socket=tmp_path / "proxy.sock")


def test_agent_hub_serves_both_or_grpc_only(tmp_path: Path) -> None:
    both = make_hub(build_config(objects_dir=tmp_path, state_dir=tmp_path, zds_socket=tmp_path / "z.sock"))
    assert isinstance(both, HubFanout)
    assert [type(h) for h in both.hubs] == [ProxyHub, ZdsHub]
    alone = make_hub(build_config(objects_dir=tmp_path, state_dir=tmp_path, zds_socket=""))
    assert isinstance(alone, ProxyHub)


class StubHub:
    def __init__(self, connected: bool = False) -> None:
        self.futs: list[futures.Future[None]] = []
        self.connected = connected
        self.listeners: list[Any] = []
        self.started = self.stopped = 0

    def start(self) -> None:
        self.started += 1

    def stop(self) -> None:
        self.stopped += 1

    def upsert(self, w: WorkloadInfo) -> futures.Future[None]:
        self.futs.append(futures.Future())
        return self.futs[-1]

    def remove(self, uid: str) -> futures.Future[None]:
        return self.upsert(WorkloadInfo(uid, "", ""))

    def status(self) -> dict[str, Any]:
        return {"connected": self.connected, "acks": 1}

    def add_peer_listener(self, listener: Any) -> None:
        self.listeners.append(listener)


def test_fanout_first_answer_wins_and_errors_fail() -> None:
    grpc_hub, zds = StubHub(), StubHub(connected=True)
    fan = HubFanout(grpc_hub, zds, names=("grpc", "zds"))
    fan.start()
    ok = fan.upsert(WorkloadInfo("u", "n", "ns"))
    assert not ok.done()
    zds.futs[-1].set_result(None)
    assert ok.result(0) is None
    assert grpc_hub.futs[-1].cancelled()  # answered: the other transport no longer waits for its proxy
    assert ok.result(0) is None
    bad = fan.upsert(WorkloadInfo("u", "n", "ns"))
    zds.futs[-1].set_exception(RuntimeError("ztunnel said no"))
    with pytest.raises(RuntimeError, match="ztunnel said no"):
        bad.result(0)
    assert fan.connected
    assert fan.status() == {"connected": True, "acks": 1, "zds": {"connected": True, "acks": 1}}
    fan.add_peer_listener(print)
    assert grpc_hub.listeners == zds.listeners == [print]
    fan.stop()
    assert (grpc_hub.started, zds.started, grpc_hub.stopped, zds.stopped) == (1, 1, 1, 1)


def test_first_answer_of_cancelled() -> None:
    f: futures.Future[None] = futures.Future()
    out = first_answer([f])
    f.cancel()
    with pytest.raises(futures.CancelledError):
        out.result(0)


def test_proxy_command_protocol_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from node_agent.commands import proxy as proxy_cmd
    from node_agent.refproxy import main

    seen: list[tuple[Any, ...]] = []

    def fake_run(*args: Any, orig_src: bool = False) -> int:
        seen.append(args + (("orig_src",) if orig_src else ()))
        return 0

    monkeypatch.setattr(main, "run", fake_run)
    r = CliRunner().invoke(proxy_cmd.proxy, ["--protocol", "zds", "--id", "z"])
    assert r.exit_code == 0, r.output
    assert seen[-1] == ("/var/run/ztunnel/ztunnel.sock", "z", False, "info", "zds")
    r = CliRunner().invoke(proxy_cmd.proxy, ["--id", "g"])
    assert seen[-1] == ("/var/run/headrace/proxy.sock", "g", False, "info", "grpc")
    CliRunner().invoke(proxy_cmd.proxy, ["--id", "o", "--orig-src"])
    last = seen.pop()
    assert last[1] == "o" and last[-1] == "orig_src"
    assert CliRunner().invoke(proxy_cmd.proxy, ["--protocol", "quic"]).exit_code != 0


@pytest.mark.parametrize("idle_kind", ["grpc", "zds"])
def test_a_transport_no_proxy_connects_to_keeps_nothing_for_pods_answered_elsewhere(
        tmp_path: Path, idle_kind: str) -> None:
    """The node's proxy speaks one protocol: the other transport (a real hub, no proxy ever connects) keeps
    the desired set for a proxy that may come, but no waiter or operation number for what the first
    answered: before, one per pod ever removed (and `pending` and headrace_agent_proxy_pending grew with them)."""
    idle = ProxyHub(str(tmp_path / "p.sock"), "a") if idle_kind == "grpc" else ZdsHub(str(tmp_path / "z.sock"))
    answering = StubHub(connected=True)
    fan = HubFanout(answering, idle)
    fan.start()
    try:
        for i in range(20):
            added = fan.upsert(WorkloadInfo(f"u{i}", "n", "ns", ips=("10.0.0.1",)))
            answering.futs[-1].set_result(None)
            assert added.result(0) is None
        removed = [fan.remove(f"u{i}") for i in range(15)]
        for fut in answering.futs[-15:]:
            fut.set_result(None)
        assert all(f.result(0) is None for f in removed)
        assert idle.status()["pending"] == 0
        assert sorted(idle.desired()) == sorted(f"u{i}" for i in range(15, 20))  # for a proxy that may come
        book = idle._book
        assert sorted(book.latest_op) == sorted(f"u{i}" for i in range(15, 20)) and not book.waiters
    finally:
        fan.stop()
