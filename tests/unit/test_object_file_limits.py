"""Object files within limits (cni.contract.object_files): a YAML alias bomb, recursive aliases, huge
files and deeply nested JSON are refused fast with an error naming the file, in the agent's objects-dir
source (which keeps serving the other files) and in the plugin's."""

from __future__ import annotations

import json
import logging
import time
import tracemalloc
from pathlib import Path

import pytest
from node_agent.sources.objects_dir import ObjectsDirSource, read_objects_dir
from node_agent.sources.store import PodStore

from cni.contract import object_files
from cni.contract.object_files import ObjectFileError, load_yaml_all
from cni.plugin.pod_source import ObjectsDirSource as PluginObjectsDir
from cni.plugin.pod_source import PodSourceError


def billion_laughs(levels: int = 9, name: str = "lol") -> str:
    """A Pod whose annotation expands to 10**levels strings through a few hundred bytes of aliases."""
    lines = ["apiVersion: v1", "kind: Pod", "metadata:", f"  name: {name}", "  namespace: app", "  annotations:"]
    lines.append('    l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]')
    for n in range(1, levels):
        lines.append(f"    l{n}: &l{n} [" + ",".join([f"*l{n - 1}"] * 10) + "]")
    lines.append("spec: {containers: [{name: app}]}")
    return "\n".join(lines) + "\n"


def good_pod(name: str, uid: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "app", "uid": uid}}


def test_billion_laughs_fails_fast_with_bounded_memory() -> None:
    text = billion_laughs()
    assert len(text) < 1000
    started = time.monotonic()
    with pytest.raises(ObjectFileError) as err:
        load_yaml_all(text, "bomb.yaml")
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, elapsed
    assert str(err.value).startswith("bomb.yaml: ") and "aliases expanded" in str(err.value)
    tracemalloc.start()  # the same again, counting every allocation
    try:
        with pytest.raises(ObjectFileError):
            load_yaml_all(text, "bomb.yaml")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024, peak


def test_recursive_alias_is_refused() -> None:
    with pytest.raises(ObjectFileError, match="recursive YAML alias"):
        load_yaml_all("a: &x [1, *x]\n", "loop.yaml")


def test_ordinary_anchors_and_multi_documents_still_load() -> None:
    docs = load_yaml_all("a: &x {k: v}\nb: *x\n---\nc: [1, 2]\n", "ok.yaml")
    assert docs == [{"a": {"k": "v"}, "b": {"k": "v"}}, {"c": [1, 2]}]


def test_expanded_node_limit_counts_aliases() -> None:
    text = "base: &b [" + ",".join(["x"] * 50) + "]\n" + "uses: [" + ",".join(["*b"] * 10) + "]\n"
    assert load_yaml_all(text, "t.yaml", max_nodes=1000)  # ~570 nodes expanded
    with pytest.raises(ObjectFileError, match="more than 300 YAML nodes"):
        load_yaml_all(text, "t.yaml", max_nodes=300)


def test_too_big_and_too_deep_files(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_text(" " * 2048)
    with pytest.raises(ObjectFileError, match="larger than 1024 bytes"):
        object_files.read_text(str(big), max_bytes=1024)
    with pytest.raises(ObjectFileError, match="nested too deep"):
        object_files.load_json("[" * 100_000 + "]" * 100_000, "deep.json")


def test_agent_source_skips_the_bomb_names_it_and_serves_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "bomb.yaml").write_text(billion_laughs())
    (tmp_path / "deep.json").write_text("[" * 50_000 + "]" * 50_000)
    (tmp_path / "loop.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata: &m {name: x, self: *m}\n")
    (tmp_path / "ok.json").write_text(json.dumps(good_pod("web", "u-web")))
    (tmp_path / "ok2.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: app, uid: u-db}\n")
    store = PodStore()
    src = ObjectsDirSource(store, tmp_path)
    caplog.set_level(logging.WARNING, logger="headrace.agent.objects")
    started = time.monotonic()
    assert src.poll_once()
    assert time.monotonic() - started < 1.0
    assert sorted(store.snapshot().pods) == ["u-db", "u-web"]
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert "skipping bomb.yaml: bomb.yaml: more than" in warnings
    assert "skipping deep.json: deep.json: invalid JSON: nested too deep" in warnings
    assert "skipping loop.yaml: loop.yaml: recursive YAML alias" in warnings


def test_agent_source_refuses_an_oversized_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(object_files, "MAX_FILE_BYTES", 4096)
    (tmp_path / "huge.json").write_text(json.dumps({**good_pod("big", "u-big"), "pad": "x" * 8000}))
    (tmp_path / "ok.json").write_text(json.dumps(good_pod("web", "u-web")))
    pods, _ = read_objects_dir(tmp_path)
    assert [p.uid for p in pods] == ["u-web"]


def test_plugin_source_refuses_the_bomb_as_pod_metadata_error(tmp_path: Path) -> None:
    (tmp_path / "lol.yaml").write_text(billion_laughs(name="lol"))
    started = time.monotonic()
    with pytest.raises(PodSourceError, match=r"lol\.yaml: more than \d+ YAML nodes"):
        PluginObjectsDir(str(tmp_path)).get_pod("app", "lol")
    assert time.monotonic() - started < 1.0


def test_plugin_source_refuses_deep_json_as_pod_metadata_error(tmp_path: Path) -> None:
    (tmp_path / "deep.json").write_text('{"kind": "Pod", "name": "deep", "x": ' + "[" * 50_000 + "]" * 50_000 + "}")
    with pytest.raises(PodSourceError, match="nested too deep"):
        PluginObjectsDir(str(tmp_path)).get_pod("app", "deep")
