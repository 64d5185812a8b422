"""The real agent with a ZDS peer playing ztunnel (a SOCK_SEQPACKET client in the test): an error ack
keeps the pod out of the mesh (no rules, `failed` with ztunnel's text, no redirection annotation);
once ztunnel accepts, the retry enrols it."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from node_agent.lab.simnode import SimNode
from node_agent.protocol import zds_wire

from tests.kernel.agent_kit import AgentRun, node_agent, wait_for
from tests.kernel.test_backend_parity import ours, request, start_app

pytestmark = pytest.mark.kernel

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


class ScriptedZtunnel:
    """Connects to the agent's ZDS socket and answers every request; adds fail while `refuse` is set."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.connect(path)
        zds_wire.send_packet(self.sock, zds_wire.hello())
        self.refuse = "ztunnel says no: cannot create the in-pod listeners"
        self.seen: list[tuple[str, str, int | None]] = []  # kind, uid, netns inode of an add
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                data, fds = zds_wire.recv_packet(self.sock)
            except OSError:
                return
            if not data:
                return
            req = zds_wire.parse_request(data, len(fds))
            inode = os.fstat(fds[0]).st_ino if fds else None
            for fd in fds:
                os.close(fd)
            self.seen.append((req.kind, req.uid, inode))
            error = self.refuse if req.kind == "add" else ""
            zds_wire.send_packet(self.sock, zds_wire.ack(error))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def env(make_node: Any) -> Iterator[tuple[SimNode, AgentRun, list[Any]]]:
    node: SimNode = make_node(headrace={})
    with node_agent(node, AgentRun) as (agent, apps):
        yield node, agent, apps


def annotation(node: SimNode, pod: Any) -> str | None:
    obj = json.loads((node.objects_dir / f"pod-{pod.namespace}-{pod.name}.json").read_text())
    return (obj["metadata"].get("annotations") or {}).get("ambient.istio.io/redirection")


def test_error_ack_fails_closed_then_the_retry_enrols(env: Any) -> None:
    node, agent, apps = env
    node.add_namespace("shop")
    client = node.add_pod("shop", "client")
    server = node.add_pod("shop", "server")
    start_app(server.netns.path, "server", apps)
    agent.start_agent()
    wait_for(lambda: Path(agent.zds_socket).exists(), 10, "ZDS socket")
    zt = ScriptedZtunnel(agent.zds_socket)
    try:
        node.set_namespace_labels("shop", AMBIENT)
        wait_for(lambda: agent.status().get(client.uid, {}).get("state") == "failed", 30, "client failed")
        row = agent.status()[client.uid]
        assert "cannot create the in-pod listeners" in row["reason"]
        assert not ours(client, "iptables")  # fail closed: no redirection without the proxy
        assert request(client, server.ipv4, b"direct") == b"server|direct"
        assert annotation(node, client) is None
        adds = [s for s in zt.seen if s[0] == "add" and s[1] == client.uid]
        assert adds and adds[0][2] == client.netns.inode()  # the fd was the pod's netns
        zt.refuse = ""  # ztunnel recovers: the backoff retry enrols the pod
        wait_for(lambda: agent.pod_state(client.uid) == "enrolled", 60, "client enrolled")
        assert ours(client, "iptables")
        wait_for(lambda: annotation(node, client) == "enabled", 15, "annotation set")
        status = agent.status()
        assert status[client.uid]["state"] == "enrolled"
    finally:
        zt.close()
