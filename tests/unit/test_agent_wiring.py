"""The agent wired in-process (fake backend and proxy hub): both pod sources feed status, health, metrics."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from node_agent.agent.config import build_config
from node_agent.agent.daemon import Agent
from node_agent.serve.status_client import query
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.agent_fake_apiserver import FakeApiServer
from tests.unit.agent_fakes import FakeBackend, FakeHub

SIDECAR = {"sidecar.istio.io/status": "{}"}


def wait(cond, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("timed out")


def make_agent(tmp_path: Path, **kw) -> Agent:
    cfg = build_config(state_dir=tmp_path / "state", metrics_addr="127.0.0.1:0", **kw)
    return Agent(cfg, backend=FakeBackend(), hub=FakeHub(), node_rules=lambda ips: None)


def test_objects_dir_agent_status_and_health(tmp_path: Path) -> None:
    objects = tmp_path / "objects"
    objects.mkdir()
    (objects / "ns.json").write_text(json.dumps({"kind": "Namespace", "metadata": {"name": "app"}}))
    (objects / "a.json").write_text(
        json.dumps({"kind": "Pod", "metadata": {"name": "a", "namespace": "app", "uid": "u-a", "annotations": SIDECAR}})
    )
    (objects / "b.json").write_text(
        json.dumps(
            {"kind": "Pod", "metadata": {"name": "b", "namespace": "app", "uid": "u-b"}, "spec": {"hostNetwork": True}}
        )
    )
    (objects / ".a.json.headrace-tmp").write_text("{")  # a write-back an agent killed mid-write left
    (objects / ".a.json.swp").write_text("")  # not ours
    agent = make_agent(tmp_path, objects_dir=objects)
    agent.start()
    try:
        assert sorted(p.name for p in objects.iterdir()) == [".a.json.swp", "a.json", "b.json", "ns.json"]
        assert agent.health is not None
        port = agent.health.port
        wait(lambda: agent.readyz()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert b"headrace_agent_reconcile_duration_seconds_count" in r.read()
        reply = query(str(agent.config.cni_socket))
        pods = {p["uid"]: p for p in reply["pods"]}
        assert pods["u-a"]["mode"] == "sidecar" and pods["u-b"]["mode"] == "none"
        assert reply["backend"] == "fake" and reply["proxy"]["connected"] is True
    finally:
        agent.stop()
    assert not agent.config.cni_socket.exists()


def test_kubernetes_agent_sees_only_its_node(tmp_path: Path) -> None:
    api = FakeApiServer()
    api.put("namespaces", {"kind": "Namespace", "metadata": {"name": "app"}})
    for name, node in (("mine", "node-a"), ("theirs", "node-b")):
        api.put(
            "pods",
            {
                "kind": "Pod",
                "metadata": {"name": name, "namespace": "app", "uid": f"u-{name}"},
                "spec": {"nodeName": node},
            },
        )
    api.start()
    kubeconfig = tmp_path / "kubeconfig"
    api.write_kubeconfig(kubeconfig)
    agent = make_agent(tmp_path, kubeconfig=kubeconfig, node_name="node-a")
    agent.start()
    try:
        wait(lambda: agent.readyz()[0])
        pods = {p["uid"] for p in query(str(agent.config.cni_socket))["pods"]}
        assert pods == {"u-mine"}
        api.put(
            "pods",
            {
                "kind": "Pod",
                "metadata": {"name": "new", "namespace": "app", "uid": "u-new"},
                "spec": {"nodeName": "node-a"},
            },
        )
        wait(lambda: "u-new" in {p["uid"] for p in query(str(agent.config.cni_socket))["pods"]})
        assert agent.health is not None
        metrics_url = f"http://127.0.0.1:{agent.health.port}/metrics"

        def sample(name: str, **labels: str) -> float:
            with urllib.request.urlopen(metrics_url, timeout=5) as r:
                text = r.read().decode()
            return next(s.value for family in text_string_to_metric_families(text) for s in family.samples
                        if s.name == name and s.labels == labels)

        assert sample("headrace_agent_kube_lists_total", resource="pods") == 1
        # the pod watcher starts failing (RBAC lost): its errors show, readiness does not change
        api.refuse["pods"] = 403
        api.drop_watches()
        wait(lambda: sample("headrace_agent_kube_watch_errors_total", resource="pods", reason="forbidden") >= 1)
        assert agent.readyz()[0]
    finally:
        agent.stop()
        api.stop()
