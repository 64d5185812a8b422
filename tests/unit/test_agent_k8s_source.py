"""The Kubernetes pod source against a real (local) HTTP server speaking list/watch JSON."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from node_agent.sources.kubernetes import KubernetesSource
from node_agent.sources.store import PodStore

from tests.unit.agent_fake_apiserver import FakeApiServer


def pod(name: str, node: str, uid: str, ns: str = "app", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels or {}},
        "spec": {"nodeName": node, "serviceAccountName": "sa-" + name},
        "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]},
    }


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": name, "labels": labels or {}}}


def wait_for(cond: Callable[[], object], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


UID1 = "11111111-1111-1111-1111-111111111111"
UID2 = "22222222-2222-2222-2222-222222222222"
UID3 = "33333333-3333-3333-3333-333333333333"


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    server.put("namespaces", namespace("app", {"istio.io/dataplane-mode": "ambient"}))
    server.put("pods", pod("p1", "node1", UID1))
    server.put("pods", pod("p2", "node2", UID2))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def source(api: FakeApiServer, tmp_path) -> Iterator[tuple[KubernetesSource, PodStore]]:
    kubeconfig = tmp_path / "kubeconfig"
    api.write_kubeconfig(kubeconfig)
    store = PodStore()
    src = KubernetesSource(store, kubeconfig, "node1", watch_timeout=30, backoff_initial=0.05, backoff_max=0.5)
    src.start()
    yield src, store
    src.stop()


def test_lists_pods_of_this_node_and_namespaces(api, source) -> None:
    _, store = source
    wait_for(lambda: store.synced)
    snap = store.snapshot()
    assert set(snap.pods) == {UID1}  # p2 is on node2: the field selector keeps it out
    p1 = snap.pods[UID1]
    assert (p1.namespace, p1.name, p1.ips, p1.service_account) == ("app", "p1", ("10.0.0.1", "fd00::1"), "sa-p1")
    assert snap.namespaces["app"].labels == {"istio.io/dataplane-mode": "ambient"}
    assert api.unauthorized == 0
    pod_lists = [q for p, q in api.requests if p == "/api/v1/pods" and "watch" not in q]
    assert pod_lists[0]["fieldSelector"] == ["spec.nodeName=node1"]


def test_watch_resumes_from_list_version_and_applies_events(api, source) -> None:
    src, store = source
    wait_for(lambda: store.synced and api.count("pods", watch=True) >= 1)
    list_rv = src.pods.resource_version
    assert api.watch_versions("pods")[0] == list_rv
    api.put("pods", pod("p3", "node1", UID3))
    wait_for(lambda: UID3 in store.snapshot().pods)
    api.put("pods", pod("p3", "node1", UID3, labels={"istio.io/dataplane-mode": "none"}))
    wait_for(lambda: store.snapshot().pods[UID3].labels.get("istio.io/dataplane-mode") == "none")
    api.delete("pods", "app", "p1")
    wait_for(lambda: UID1 not in store.snapshot().pods)
    api.put("namespaces", namespace("app"))
    wait_for(lambda: store.snapshot().namespaces["app"].labels == {})
    assert api.count("pods", watch=False) == 1  # no re-list needed


def test_dropped_watch_resumes_without_relist(api, source) -> None:
    src, store = source
    wait_for(lambda: store.synced and api.count("pods", watch=True) >= 1)
    api.put("pods", pod("p3", "node1", UID3))
    wait_for(lambda: UID3 in store.snapshot().pods)
    rv_before_drop = src.pods.resource_version
    watches = api.count("pods", watch=True)
    api.drop_watches()
    wait_for(lambda: api.count("pods", watch=True) > watches)
    assert api.watch_versions("pods")[-1] == rv_before_drop
    api.delete("pods", "app", "p3")
    wait_for(lambda: UID3 not in store.snapshot().pods)
    assert api.count("pods", watch=False) == 1


def test_410_gone_forces_a_relist(api, source) -> None:
    src, store = source
    wait_for(lambda: store.synced and api.count("pods", watch=True) >= 1)
    # changes the watch never sees: p1 deleted and p3 created during the "gap"
    api.delete("pods", "app", "p1", silent=True)
    api.put("pods", pod("p3", "node1", UID3), silent=True)
    api.compact()
    api.drop_watches()
    wait_for(lambda: api.count("pods", watch=False) >= 2)
    wait_for(lambda: set(store.snapshot().pods) == {UID3})
    assert src.pods.lists >= 2


def test_errors_back_off_and_recover(api, tmp_path) -> None:
    api.fail_next = 3
    kubeconfig = tmp_path / "kubeconfig"
    api.write_kubeconfig(kubeconfig)
    store = PodStore()
    src = KubernetesSource(store, kubeconfig, "node1", watch_timeout=30, backoff_initial=0.05, backoff_max=0.2)
    src.start()
    try:
        wait_for(lambda: store.synced)
        assert UID1 in store.snapshot().pods
    finally:
        src.stop()

