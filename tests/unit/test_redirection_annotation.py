"""`ambient.istio.io/redirection: enabled` on enrolled ambient pods: what to write (pure), the marker's
retries, the PATCH the Kubernetes source sends (checked at a local API server speaking real JSON), and
the objects-dir write-back."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from node_agent.sources.kubernetes import KubernetesSource
from node_agent.sources.objects_dir import read_objects_dir
from node_agent.sources.objects_write import sweep_unfinished, write_pod_annotation
from node_agent.sources.redirection_mark import ANNOTATION, Change, RedirectionMarker, changes, merge_patch
from node_agent.sources.store import PodStore

from cni.contract.kube_objects import Pod, pod_from_object
from tests.unit.agent_fake_apiserver import FakeApiServer

UID1 = "11111111-1111-1111-1111-111111111111"
UID2 = "22222222-2222-2222-2222-222222222222"
UID3 = "33333333-3333-3333-3333-333333333333"


def pod_obj(name: str, uid: str, annotations: dict[str, str] | None = None, ns: str = "app") -> dict[str, Any]:
    return {
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "annotations": annotations or {}},
        "spec": {"nodeName": "node1"}, "status": {"phase": "Running", "podIP": "10.0.0.1"},
    }


def pod(name: str, uid: str, annotations: dict[str, str] | None = None) -> Pod:
    return pod_from_object(pod_obj(name, uid, annotations))


def row(uid: str, state: str, mode: str = "ambient") -> dict[str, Any]:
    return {"uid": uid, "state": state, "mode": mode}


def test_changes_set_on_enrolled_remove_when_not_held() -> None:
    pods = {
        UID1: pod("enrolled", UID1),
        UID2: pod("left", UID2, {ANNOTATION: "enabled"}),
        UID3: pod("pending", UID3, {ANNOTATION: "enabled"}),
    }
    rows = [row(UID1, "enrolled"), row(UID3, "pending")]
    assert changes(rows, pods) == [Change(UID1, "app", "enrolled", True), Change(UID2, "app", "left", False)]
    # already right: nothing to do; a sidecar pod is not ambient-enrolled
    done = {UID1: pod("enrolled", UID1, {ANNOTATION: "enabled"})}
    assert changes([row(UID1, "enrolled")], done) == []
    assert changes([row(UID1, "enrolled", mode="sidecar")], done) == [Change(UID1, "app", "enrolled", False)]


def test_merge_patch() -> None:
    assert merge_patch(True) == {"metadata": {"annotations": {ANNOTATION: "enabled"}}}
    assert merge_patch(False) == {"metadata": {"annotations": {ANNOTATION: None}}}


def test_marker_waits_for_the_first_pass_retries_and_does_not_repeat() -> None:
    now = [0.0]
    calls: list[tuple[str, str, bool]] = []
    fail = [True]

    def writer(ns: str, name: str, enabled: bool) -> None:
        calls.append((ns, name, enabled))
        if fail[0]:
            raise OSError("api down")

    ready = [False]
    m = RedirectionMarker(lambda: [row(UID1, "enrolled")], lambda: {UID1: pod("p", UID1)}, lambda: ready[0],
                          writer, retry_after=5.0, clock=lambda: now[0])
    assert m.sync_once() == 0 and calls == []
    ready[0] = True
    assert m.sync_once() == 0 and m.failures == 1
    now[0] = 1.0
    assert m.sync_once() == 0 and len(calls) == 1  # not before retry_after
    fail[0] = False
    now[0] = 6.0
    assert m.sync_once() == 1 and calls[-1] == ("app", "p", True)
    now[0] = 7.0
    assert m.sync_once() == 0 and len(calls) == 2  # the source has not caught up yet: no repeat


def test_a_burst_of_changes_is_written_once_it_calms_down() -> None:
    """While changes keep coming (an enrolment wave) nothing is written; then all of it at once."""
    enrolled: list[str] = []
    calls: list[tuple[str, str, bool]] = []
    pods = {f"u{i}": pod(f"p{i}", f"u{i}") for i in range(5)}
    m = RedirectionMarker(lambda: [row(u, "enrolled") for u in enrolled], lambda: pods, lambda: True,
                          lambda ns, name, on: calls.append((ns, name, on)), interval=60, settle=0.3, max_delay=5)
    m.start()
    try:
        time.sleep(0.2)  # the first pass: nothing enrolled yet
        for i in range(5):
            enrolled.append(f"u{i}")
            m.wake()
            time.sleep(0.1)  # closer together than `settle`
        assert calls == []
        deadline = time.monotonic() + 5
        while len(calls) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(name for _, name, _ in calls) == [f"p{i}" for i in range(5)]
    finally:
        m.stop()


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    server.put("namespaces", {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "app"}})
    server.put("pods", pod_obj("p1", UID1, {"keep": "me"}))
    server.start()
    yield server
    server.stop()


def test_kubernetes_source_patches_the_pod_status(api: FakeApiServer, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    api.write_kubeconfig(kubeconfig)
    store = PodStore()
    src = KubernetesSource(store, kubeconfig, "node1", watch_timeout=30, backoff_initial=0.05)
    src.start()
    try:
        src.patch_redirection("app", "p1", True)
        path, ctype, body = api.patches[-1]
        assert path == "/api/v1/namespaces/app/pods/p1/status"
        assert ctype == "application/merge-patch+json"
        assert body == {"metadata": {"annotations": {ANNOTATION: "enabled"}}}
        deadline = time.monotonic() + 10
        while store.snapshot().pods.get(UID1) is None or ANNOTATION not in store.snapshot().pods[UID1].annotations:
            assert time.monotonic() < deadline, "the watch never showed the annotation"
            time.sleep(0.02)
        assert dict(store.snapshot().pods[UID1].annotations) == {"keep": "me", ANNOTATION: "enabled"}
        src.patch_redirection("app", "p1", False)
        assert api.patches[-1][2] == {"metadata": {"annotations": {ANNOTATION: None}}}
        assert api.objects["pods"]["app/p1"]["metadata"]["annotations"] == {"keep": "me"}
        src.patch_redirection("app", "gone", False)  # a pod that is gone is not an error
        assert api.patches[-1][0] == "/api/v1/namespaces/app/pods/gone/status"
    finally:
        src.stop()


def test_objects_dir_write_back_json_yaml_and_lists(tmp_path: Path) -> None:
    (tmp_path / "p1.json").write_text(json.dumps(pod_obj("p1", UID1)))
    (tmp_path / "many.yaml").write_text(yaml.safe_dump_all([
        {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "app"}},
        {"kind": "List", "items": [pod_obj("p2", UID2), pod_obj("p3", UID3, {"x": "y"})]},
    ]))
    assert write_pod_annotation(tmp_path, "app", "p1", True)
    assert write_pod_annotation(tmp_path, "app", "p3", True)
    assert not write_pod_annotation(tmp_path, "app", "nope", True)
    pods = {p.uid: p for p in read_objects_dir(tmp_path)[0]}
    assert pods[UID1].annotations.get(ANNOTATION) == "enabled"
    assert ANNOTATION not in pods[UID2].annotations
    assert dict(pods[UID3].annotations) == {"x": "y", ANNOTATION: "enabled"}
    before = (tmp_path / "p1.json").stat().st_mtime_ns
    assert write_pod_annotation(tmp_path, "app", "p1", True)  # already there: file untouched
    assert (tmp_path / "p1.json").stat().st_mtime_ns == before
    assert write_pod_annotation(tmp_path, "app", "p3", False)
    pods = {p.uid: p for p in read_objects_dir(tmp_path)[0]}
    assert dict(pods[UID3].annotations) == {"x": "y"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_unfinished_write_backs_are_swept_and_nothing_else(tmp_path: Path) -> None:
    """An agent killed between writing `.<file>.headrace-tmp` and renaming it leaves it behind: the next
    agent removes it (and a symlink of that name, which a write would follow) before it writes anything."""
    (tmp_path / "pod.json").write_text("{}")
    (tmp_path / ".pod.json.headrace-tmp").write_text("{")
    (tmp_path / ".other.yaml.headrace-tmp").symlink_to(tmp_path / "pod.json")
    (tmp_path / ".dir.headrace-tmp").mkdir()
    (tmp_path / "pod.json.headrace-tmp").write_text("")  # not hidden: not a name we write
    assert sweep_unfinished(tmp_path) == [".other.yaml.headrace-tmp", ".pod.json.headrace-tmp"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".dir.headrace-tmp", "pod.json", "pod.json.headrace-tmp"]
    assert (tmp_path / "pod.json").read_text() == "{}"
    assert sweep_unfinished(tmp_path / "missing") == []
