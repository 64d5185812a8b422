"""The agent follows the node proxy's cgroup: peer pids → directory → backend.set_proxy_cgroup (no root).

Covers the follower's decisions (detect, follow a move, refuse root / the agent's own cgroup, --proxy-cgroup
wins, ambiguity, backend errors), `locate` on a fake /proc + mountinfo, the socket side (SO_PEERCRED on the
netns-fd side channel, sock_diag peers of the gRPC socket with a real `headrace proxy` process), and the
agent's status / metrics / `headrace status` text.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from node_agent.backends.base import BackendError
from node_agent.protocol.fd_channel import NetnsFdError, NetnsFdServer, fetch_netns_fd, peer_pid
from node_agent.proxy.cgroup_follow import Located, ProxyCgroupFollower, locate, saved_proxy_cgroup
from node_agent.proxy.hub import ProxyHub
from node_agent.proxy.peers import SOCK_DIAG_BY_FAMILY, UnixDiagError, client_pids, parse_dump
from node_agent.serve.metrics import AgentMetrics
from node_agent.serve.status_client import proxy_cgroup_text

from cni.netlink.netlink_parse import NLMSG_DONE, NLMSG_ERROR

HEADRACE = str(Path(sys.executable).parent / "headrace")


class Recorder:
    def __init__(self, fail: str = "") -> None:
        self.calls: list[Path | None] = []
        self.fail = fail

    def __call__(self, path: Path | None) -> None:
        if self.fail:
            raise BackendError(self.fail)
        self.calls.append(path)


def follower(tmp_path: Path, table: dict[int, tuple[str, str]], *, flag: Path | None = None,
             apply: Recorder | None = None, agent: str = "/agent") -> tuple[ProxyCgroupFollower, Recorder, list[str]]:
    """table: pid -> (cgroup v2 path, directory name under tmp_path)."""
    rec = apply if apply is not None else Recorder()
    changes: list[str] = []

    def fake_locate(pid: int) -> Located:
        if pid not in table:
            raise OSError(f"no such process {pid}")
        cg, d = table[pid]
        return Located(pid, cg, tmp_path / d)

    f = ProxyCgroupFollower(rec, flag, on_change=changes.append, locate_fn=fake_locate, agent_cgroup=agent)
    return f, rec, changes


def test_detects_and_follows_a_move(tmp_path: Path) -> None:
    f, rec, changes = follower(tmp_path, {10: ("/proxy-a", "a"), 11: ("/proxy-b", "b")})
    assert f.status()["source"] == "none"
    f.observe({10}, "grpc")
    assert rec.calls == [tmp_path / "a"] and f.source == "peer" and f.path == tmp_path / "a"
    f.observe({10}, "netns-fd")  # same cgroup again: nothing to do
    assert rec.calls == [tmp_path / "a"]
    f.observe({11}, "grpc")  # the proxy restarted elsewhere
    assert rec.calls == [tmp_path / "a", tmp_path / "b"]
    assert changes == ["peer", "peer"]
    st = f.status()
    assert st["source"] == "peer" and st["path"] == str(tmp_path / "b") and st["detected_pid"] == 11
    assert st["via"] == "grpc" and st["problem"] == "" and st["needed"] is True


def test_root_and_agent_cgroup_are_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f, rec, _ = follower(tmp_path, {1: ("/", "root"), 2: ("/agent", "agent"), 3: ("/proxy", "p")})
    with caplog.at_level(logging.ERROR, logger="headrace.proxy_cgroup"):
        f.observe({1}, "grpc")
    assert rec.calls == [] and f.source == "none"
    assert "root cgroup" in f.status()["problem"]
    assert any("proxy cgroup not used" in r.getMessage() and "root cgroup" in r.getMessage() for r in caplog.records)
    f.observe({2}, "netns-fd")
    assert rec.calls == [] and "agent's own cgroup" in f.status()["problem"]
    # detected, then the proxy moves into a refused cgroup: the backend forgets the old one
    f.observe({3}, "grpc")
    assert rec.calls == [tmp_path / "p"] and f.status()["source"] == "peer"
    f.observe({2}, "grpc")
    assert rec.calls == [tmp_path / "p", None] and f.status()["source"] == "none" and f.path is None
    assert "agent's own cgroup" in f.status()["problem"]


def test_flag_wins_and_a_different_detection_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    flag = tmp_path / "flagged"
    f, rec, changes = follower(tmp_path, {5: ("/proxy", "p"), 6: ("/flagged", "flagged")}, flag=flag)
    with caplog.at_level(logging.WARNING, logger="headrace.proxy_cgroup"):
        f.observe({5}, "grpc")
        f.observe({5}, "grpc")  # logged once per detected change
    wins = [r.getMessage() for r in caplog.records if "wins over" in r.getMessage()]
    assert len(wins) == 1 and str(flag) in wins[0] and str(tmp_path / "p") in wins[0]
    assert rec.calls == [] and changes == [] and f.source == "flag" and f.path == flag
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="headrace.proxy_cgroup"):
        f.observe({6}, "grpc")
    assert not [r for r in caplog.records if "wins over" in r.getMessage()]
    st = f.status()
    assert st["source"] == "flag" and st["path"] == str(flag) and st["detected"] == str(flag)


def test_ambiguous_peers_change_nothing(tmp_path: Path) -> None:
    f, rec, _ = follower(tmp_path, {7: ("/a", "a"), 8: ("/b", "b")})
    f.observe({7, 8}, "grpc")
    assert rec.calls == [] and f.source == "none" and "different cgroups" in f.status()["problem"]
    f.observe({7, 999}, "grpc")  # a pid that vanished does not spoil the others
    assert rec.calls == [tmp_path / "a"]


def test_backend_refusal_keeps_the_previous_state(tmp_path: Path) -> None:
    f, _rec, changes = follower(tmp_path, {7: ("/a", "a")}, apply=Recorder(fail="proxy cgroup: is a cgroup2 root"))
    f.observe({7}, "grpc")
    assert f.source == "none" and changes == [] and "cgroup2 root" in f.status()["problem"]


def test_own_pid_and_unknown_pids_are_ignored(tmp_path: Path) -> None:
    f, rec, _ = follower(tmp_path, {os.getpid(): ("/a", "a")})
    f.observe({os.getpid(), 0, -1}, "grpc")
    f.observe({424242}, "grpc")
    assert rec.calls == [] and f.source == "none"


def test_without_a_setter_detection_is_only_reported(tmp_path: Path) -> None:
    f = ProxyCgroupFollower(None, None, locate_fn=lambda pid: Located(pid, "/p", tmp_path), agent_cgroup="/agent")
    f.observe({9}, "grpc")
    st = f.status()
    assert st["needed"] is False and st["path"] == str(tmp_path)
    assert "not needed" in proxy_cgroup_text(st)


def test_locate_on_a_fake_proc(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "123").mkdir(parents=True)
    (proc / "123" / "cgroup").write_text("4:memory:/x\n0::/kubepods/proxy\n")
    cg = tmp_path / "cg"
    (cg / "kubepods" / "proxy").mkdir(parents=True)
    (cg / "kubepods" / "proxy" / "cgroup.procs").write_text("122\n123\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"41 35 0:38 / {cg} rw - cgroup2 cgroup2 rw\n")
    got = locate(123, str(proc), str(mountinfo))
    assert got == Located(123, "/kubepods/proxy", cg / "kubepods" / "proxy")
    # the path as this process sees it is not where the pid is (another cgroup namespace): search
    (proc / "123" / "cgroup").write_text("0::/../../elsewhere\n")
    (cg / "nested" / "deep").mkdir(parents=True)
    (cg / "kubepods" / "proxy" / "cgroup.procs").write_text("122\n")
    (cg / "nested" / "deep" / "cgroup.procs").write_text("123\n")
    assert locate(123, str(proc), str(mountinfo)).directory == cg / "nested" / "deep"
    (cg / "nested" / "deep" / "cgroup.procs").write_text("")
    with pytest.raises(ValueError, match="in no directory"):
        locate(123, str(proc), str(mountinfo))
    mountinfo.write_text("")
    with pytest.raises(ValueError, match="no cgroup2"):
        locate(123, str(proc), str(mountinfo))


def test_the_path_in_use_is_saved_and_restored(tmp_path: Path) -> None:
    state = tmp_path / "state" / "proxy-cgroup"
    (tmp_path / "a").mkdir()
    f, _rec, _ = follower(tmp_path, {3: ("/a", "a"), 1: ("/", "root")})
    f._state_file = state
    f.observe({3}, "grpc")
    assert state.read_text().strip() == str(tmp_path / "a")
    assert saved_proxy_cgroup(state) == tmp_path / "a"
    restored = ProxyCgroupFollower(Recorder(), None, state_file=state, restored=tmp_path / "a", agent_cgroup="/x")
    st = restored.status()
    assert (st["source"], st["path"], st["via"]) == ("peer", str(tmp_path / "a"), "saved")
    f.observe({1}, "grpc")  # refused after a detection: forgotten, also on disk
    assert not state.exists() and saved_proxy_cgroup(state) is None
    # a saved directory that is gone, or garbage, is not restored
    state.write_text(str(tmp_path / "gone") + "\n")
    assert saved_proxy_cgroup(state) is None
    state.write_text("relative\n")
    assert saved_proxy_cgroup(state) is None
    # --proxy-cgroup is saved too (the backend attaches there; a later start without the flag resumes it)
    ProxyCgroupFollower(Recorder(), tmp_path / "a", state_file=state, agent_cgroup="/x")
    assert saved_proxy_cgroup(state) == tmp_path / "a"


# ---- the socket side ---------------------------------------------------------------------------------------
@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="hr-pcg-", dir="/tmp")  # short: unix socket paths are limited to 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_peer_pid_of_a_socketpair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert peer_pid(a) == os.getpid()


def test_side_channel_reports_the_clients_pid(sockdir: str) -> None:
    seen: list[int] = []
    server = NetnsFdServer(os.path.join(sockdir, "s.sock"), lambda uid: None, on_peer=seen.append)
    server.start()
    try:
        with pytest.raises(NetnsFdError, match="unknown workload"):
            fetch_netns_fd(server.path, "nope")
    finally:
        server.stop()
    assert seen == [os.getpid()]


def test_side_channel_survives_a_failing_peer_callback(sockdir: str) -> None:
    def boom(pid: int) -> None:
        raise RuntimeError("listener bug")

    server = NetnsFdServer(os.path.join(sockdir, "s.sock"), lambda uid: None, on_peer=boom)
    server.start()
    try:
        with pytest.raises(NetnsFdError, match="unknown workload"):
            fetch_netns_fd(server.path, "nope")
    finally:
        server.stop()


def test_client_pids_of_a_listening_socket(sockdir: str) -> None:
    tmp, final = os.path.join(sockdir, "tmp.sock"), os.path.join(sockdir, "final.sock")
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(tmp)
        srv.listen()
        os.rename(tmp, final)  # as the agent binds (private_bind_path): matched by inode, not by name
        code = f"import socket,time; c=socket.socket(socket.AF_UNIX); c.connect({final!r}); time.sleep(20)"
        child = subprocess.Popen([sys.executable, "-c", code])
        try:
            conn, _ = srv.accept()
            with conn:
                assert client_pids(final) == {child.pid}
        finally:
            child.kill()
            child.wait(5)


def _nl(mtype: int, body: bytes) -> bytes:
    msg = struct.pack("=IHHII", 16 + len(body), mtype, 0, 1, 0) + body
    return msg + b"\0" * ((4 - len(msg) % 4) % 4)


def test_parse_dump() -> None:
    vfs = struct.pack("=HH", 12, 1) + struct.pack("=II", 555, 7)
    peer = struct.pack("=HH", 8, 2) + struct.pack("=I", 999)
    body = struct.pack("=BBBBIII", socket.AF_UNIX, 1, 1, 0, 42, 0, 0) + vfs + peer
    rows, done = parse_dump(_nl(SOCK_DIAG_BY_FAMILY, body) + _nl(NLMSG_DONE, b"\0\0\0\0"))
    assert rows == [(42, 555, 999)] and done
    rows, done = parse_dump(_nl(SOCK_DIAG_BY_FAMILY, struct.pack("=BBBBIII", 1, 1, 1, 0, 43, 0, 0)))
    assert rows == [(43, None, None)] and not done
    with pytest.raises(UnixDiagError, match="Operation not permitted"):
        parse_dump(_nl(NLMSG_ERROR, struct.pack("=i", -1) + b"\0" * 16))


def test_hub_reports_the_grpc_peer_pid(sockdir: str) -> None:
    """A real `headrace proxy` process: grpcio shows only "unix:" as peer; sock_diag + /proc name the pid."""
    hub = ProxyHub(os.path.join(sockdir, "proxy.sock"), "agent-test")
    got: list[tuple[set[int], str]] = []
    hub.add_peer_listener(lambda pids, via: got.append((pids, via)))
    hub.start()
    proxy = subprocess.Popen([HEADRACE, "proxy", "--socket", hub.socket_path, "--id", "pcg"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 15
        while not got and time.monotonic() < end:
            time.sleep(0.05)
        assert got == [({proxy.pid}, "grpc")]
    finally:
        proxy.kill()
        proxy.wait(5)
        hub.stop(grace=0.2)


# ---- status and metrics ------------------------------------------------------------------------------------
def test_status_text() -> None:
    assert proxy_cgroup_text({"source": "peer", "path": "/cg/p", "needed": True}) == "proxy cgroup: /cg/p (peer)"
    assert proxy_cgroup_text({"source": "flag", "path": "/cg/f"}) == "proxy cgroup: /cg/f (flag)"
    text = proxy_cgroup_text({"source": "none", "path": "", "problem": "refused: root"})
    assert text == "proxy cgroup: none; refused: root"


def test_metric_has_one_current_source() -> None:
    m = AgentMetrics()
    values: dict[str, Any] = {}

    def read() -> dict[str, Any]:
        for fam in m.registry.collect():
            if fam.name == "headrace_agent_proxy_cgroup_source":
                for s in fam.samples:
                    values[s.labels["source"]] = s.value
        return values

    assert read() == {"flag": 0, "peer": 0, "none": 1}
    m.proxy_cgroup_source("peer")
    assert read() == {"flag": 0, "peer": 1, "none": 0}


def test_agent_wires_the_follower_into_status_and_metrics(tmp_path: Path) -> None:
    from node_agent.agent.config import build_config
    from node_agent.agent.daemon import Agent
    from node_agent.serve.status_client import query, render_table

    from tests.unit.agent_fakes import FakeBackend, FakeHub

    class CgroupBackend(FakeBackend):
        needs_cgroup = True  # as eBPF: the node proxy's cgroup is handed to it
        change_events = False

        def __init__(self) -> None:
            super().__init__()
            self.proxy_cgroups: list[str | Path | None] = []

        def set_proxy_cgroup(self, path: str | Path | None) -> None:
            self.proxy_cgroups.append(path)

    objects = tmp_path / "objects"
    objects.mkdir()
    cfg = build_config(state_dir=tmp_path / "state", objects_dir=objects, cni_socket=tmp_path / "cni.sock")
    backend, hub = CgroupBackend(), FakeHub()
    agent = Agent(cfg, backend=backend, hub=hub, node_rules=lambda ips: None)
    proxy_dir = tmp_path / "proxy"
    agent.proxy_cgroups._locate = lambda pid: Located(pid, "/proxy", proxy_dir)
    agent.proxy_cgroups._agent_cgroup = "/agent"
    agent.start()
    try:
        assert not agent.proxy_cgroup_file.exists()
        reply = query(str(cfg.cni_socket))
        assert reply["proxy_cgroup"]["source"] == "none"
        assert "proxy cgroup: none" in render_table(reply)
        hub.listeners[0]({4242}, "grpc")
        assert backend.proxy_cgroups == [proxy_dir]
        reply = query(str(cfg.cni_socket))
        assert reply["proxy_cgroup"]["source"] == "peer" and reply["proxy_cgroup"]["path"] == str(proxy_dir)
        assert f"proxy cgroup: {proxy_dir} (peer)" in render_table(reply)
        samples = {s.labels["source"]: s.value for fam in agent.metrics.registry.collect()
                   if fam.name == "headrace_agent_proxy_cgroup_source" for s in fam.samples}
        assert samples == {"flag": 0, "peer": 1, "none": 0}
        assert agent.proxy_cgroup_file.read_text().strip() == str(proxy_dir)
    finally:
        agent.stop()
    # the next agent starts from the saved cgroup
    proxy_dir.mkdir()
    again = Agent(cfg, backend=CgroupBackend(), hub=FakeHub(), node_rules=lambda ips: None)
    st = again.proxy_cgroups.status()
    assert (st["source"], st["path"], st["via"]) == ("peer", str(proxy_dir), "saved")
