from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from node_agent.sources.objects_dir import ObjectsDirSource, read_objects_dir
from node_agent.sources.store import PodStore


def write(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj))


def ns(name: str, labels: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}


def pod(name: str, uid: str, node: str = "") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "app", "uid": uid},
        "spec": {"nodeName": node} if node else {},
    }


def test_reads_json_yaml_and_lists(tmp_path: Path) -> None:
    write(tmp_path / "ns.json", ns("app", {"istio.io/dataplane-mode": "ambient"}))
    write(tmp_path / "p1.json", pod("p1", "u1"))
    (tmp_path / "p2.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p2\n  namespace: app\n  uid: u2\n"
        "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: other\n"
    )
    write(tmp_path / "list.json", {"kind": "List", "items": [pod("p3", "u3"), pod("p4", "u4", node="elsewhere")]})
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "notes.txt").write_text("ignored")
    pods, namespaces = read_objects_dir(tmp_path, node_name="here")
    assert sorted(p.uid for p in pods) == ["u1", "u2", "u3"]  # u4 is on another node
    assert sorted(n.name for n in namespaces) == ["app", "other"]


def test_poll_sees_changes(tmp_path: Path) -> None:
    write(tmp_path / "ns.json", ns("app"))
    write(tmp_path / "p1.json", pod("p1", "u1"))
    store = PodStore()
    src = ObjectsDirSource(store, tmp_path, interval=0.05)
    src.start()
    try:
        assert store.synced
        assert store.snapshot().namespaces["app"].labels == {}
        write(tmp_path / "ns.json", ns("app", {"istio.io/dataplane-mode": "ambient"}))
        deadline = time.monotonic() + 5
        while store.snapshot().namespaces["app"].labels == {} and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.snapshot().namespaces["app"].labels == {"istio.io/dataplane-mode": "ambient"}
        (tmp_path / "p1.json").unlink()
        while store.snapshot().pods and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not store.snapshot().pods
    finally:
        src.stop()
    assert not src.poll_once()  # nothing changed since


def test_a_file_that_stops_parsing_keeps_its_last_good_content(tmp_path: Path) -> None:
    write(tmp_path / "ns.json", ns("app"))
    write(tmp_path / "p1.json", pod("p1", "u1"))
    store = PodStore()
    src = ObjectsDirSource(store, tmp_path, interval=60)
    src.poll_once()
    assert set(store.snapshot().pods) == {"u1"}
    (tmp_path / "p1.json").write_text('{"kind": "Pod", "metadata": {')  # caught half-written
    assert src.poll_once()
    assert set(store.snapshot().pods) == {"u1"} and "app" in store.snapshot().namespaces
    (tmp_path / "p1.json").unlink()
    assert src.poll_once()
    assert not store.snapshot().pods
    (tmp_path / "p1.json").write_text("{not json")  # a new file that never parsed serves nothing
    assert src.poll_once()
    assert not store.snapshot().pods


def test_an_empty_dir_is_synced(tmp_path: Path) -> None:
    store = PodStore()
    src = ObjectsDirSource(store, tmp_path, use_inotify=False)
    assert src.poll_once() and store.synced and not store.snapshot().pods
    assert not src.poll_once()


def test_read_named_reads_only_those_files_and_the_full_look_then_finds_nothing_new(tmp_path: Path) -> None:
    write(tmp_path / "ns.json", ns("app"))
    write(tmp_path / "p1.json", pod("p1", "u1"))
    write(tmp_path / "p2.json", pod("p2", "u2"))
    store = PodStore()
    src = ObjectsDirSource(store, tmp_path, use_inotify=False)
    assert src.poll_once()
    loads = src.loads
    write(tmp_path / "p1.json", pod("p1-renamed", "u1"))
    write(tmp_path / "p2.json", pod("p2-renamed", "u2"))  # not named: not read by read_named
    (tmp_path / "p3.json").write_text("{")  # named but unparseable: skipped, nothing served
    assert src.read_named(["p1.json", "p3.json", ".p1.json.tmp", "../ns.json"])
    assert src.loads == loads + 1
    assert {p.name for p in store.snapshot().pods.values()} == {"p1-renamed", "p2"}
    assert not src.read_named([".hidden.json", "notes.txt"])
    (tmp_path / "p1.json").unlink()
    assert src.read_named(["p1.json"])  # removed
    assert {p.name for p in store.snapshot().pods.values()} == {"p2"}
    assert src.poll_once()  # the full look finds p2.json changed
    assert {p.name for p in store.snapshot().pods.values()} == {"p2-renamed"}
    assert not src.poll_once()
