from __future__ import annotations

from typing import Any

import pytest
from node_agent.sources.desired import desired_pods, pod_mode
from node_agent.sources.store import PodStore

from cni.contract.kube_objects import Namespace, ObjectError, Pod, pod_from_object

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def p(**kw: Any) -> Pod:
    base: dict[str, Any] = {"uid": "u1", "namespace": "app", "name": "p"}
    base.update(kw)
    return Pod(**base)


@pytest.mark.parametrize(
    ("pod", "ns_labels", "mode"),
    [
        (p(), AMBIENT, "ambient"),
        (p(), {}, "none"),
        (p(labels=AMBIENT), {}, "ambient"),
        (p(labels={"istio.io/dataplane-mode": "none"}), AMBIENT, "none"),
        (p(annotations={"sidecar.istio.io/status": "{}"}), AMBIENT, "sidecar"),
        (p(host_network=True), AMBIENT, "none"),
        (p(host_network=True, labels=AMBIENT), AMBIENT, "none"),
        (p(namespace="kube-system", labels=AMBIENT), AMBIENT, "none"),
        (p(phase="Succeeded"), AMBIENT, "none"),
    ],
)
def test_mode(pod: Pod, ns_labels: dict[str, str], mode: str) -> None:
    got, reason = pod_mode(pod, Namespace(pod.namespace, ns_labels), ("kube-system",))
    assert got == mode
    assert reason


def test_missing_namespace_object_means_not_labelled() -> None:
    assert pod_mode(p(), None, ())[0] == "none"


def test_desired_pods_from_store() -> None:
    store = PodStore()
    store.replace_namespaces([Namespace("app", AMBIENT), Namespace("other", {})])
    store.replace_pods(
        [p(uid="a"), p(uid="b", namespace="other"), p(uid="c", labels={"istio.io/dataplane-mode": "none"})]
    )
    d = desired_pods(store.snapshot(), ("kube-system",))
    assert {u: x.mode for u, x in d.items()} == {"a": "ambient", "b": "none", "c": "none"}
    assert d["a"].reason == "namespace label"
    assert d["c"].reason == "pod opted out"


def test_pod_from_object_derives_uid_and_ips() -> None:
    rec = pod_from_object(
        {
            "metadata": {"name": "x", "namespace": "n"},
            "spec": {"hostNetwork": True},
            "status": {"podIPs": [{"ip": "10.1.1.1"}, {"ip": "fd00::5"}]},
        }
    )
    assert rec.uid and rec.uid == pod_from_object({"metadata": {"name": "x", "namespace": "n"}}).uid
    assert rec.ips == ("10.1.1.1", "fd00::5")
    assert rec.host_network


def test_store_notifies_only_on_change() -> None:
    store = PodStore()
    hits: list[int] = []
    store.subscribe(lambda: hits.append(1))
    store.replace_pods([p()])
    store.replace_namespaces([])
    assert store.synced and len(hits) == 2
    store.replace_pods([p()])
    store.upsert_pod(p())
    assert len(hits) == 2
    store.upsert_pod(p(labels=AMBIENT))
    store.delete_pod("u1")
    store.delete_pod("u1")
    assert len(hits) == 4


def test_pod_uid_must_be_safe_for_paths() -> None:
    with pytest.raises(ObjectError, match=r"invalid metadata\.uid"):
        pod_from_object({"metadata": {"name": "x", "namespace": "n", "uid": "../../etc"}})
