"""The objects-dir source reacts to file changes through inotify, with no rescan in sight (rescan and poll
an hour away): a new file, an editor's atomic rename, a half-written file finished later, a removal."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from node_agent.sources.dir_events import DirEvents
from node_agent.sources.objects_dir import ObjectsDirSource
from node_agent.sources.store import PodStore

HOUR = 3600.0


def pod(name: str, uid: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "app", "uid": uid}}


def eventually(cond: Callable[[], bool], timeout: float = 2.0) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "no change seen"
        time.sleep(0.005)
    return time.monotonic() - t0


@pytest.fixture
def source(tmp_path: Path) -> Iterator[tuple[ObjectsDirSource, PodStore]]:
    store = PodStore()
    src = ObjectsDirSource(store, tmp_path, interval=HOUR, rescan=HOUR)
    src.start()
    try:
        assert src.using_inotify
        yield src, store
    finally:
        src.stop()


def test_writes_renames_and_removals_are_seen_at_once(tmp_path: Path,
                                                      source: tuple[ObjectsDirSource, PodStore]) -> None:
    _src, store = source
    (tmp_path / "a.json").write_text(json.dumps(pod("a", "u-a")))
    assert eventually(lambda: "u-a" in store.snapshot().pods) < 1.0
    tmp = tmp_path / ".b.json.swp"  # an editor/tool: write a hidden temp file, rename it into place
    tmp.write_text(json.dumps(pod("b", "u-b")))
    time.sleep(0.1)
    assert "u-b" not in store.snapshot().pods  # hidden files are not objects
    os.rename(tmp, tmp_path / "b.json")
    eventually(lambda: "u-b" in store.snapshot().pods)
    (tmp_path / "a.json").unlink()
    eventually(lambda: "u-a" not in store.snapshot().pods)
    assert set(store.snapshot().pods) == {"u-b"}


def test_a_half_written_file_keeps_its_last_good_content_until_it_is_whole(
        tmp_path: Path, source: tuple[ObjectsDirSource, PodStore]) -> None:
    _src, store = source
    path = tmp_path / "p.json"
    path.write_text(json.dumps(pod("p", "u-1")))
    eventually(lambda: "u-1" in store.snapshot().pods)
    whole = json.dumps(pod("p", "u-2"))
    with open(path, "w") as f:  # the writer is slow: half of it, then the rest
        f.write(whole[: len(whole) // 2])
        f.flush()
        time.sleep(0.3)
        assert set(store.snapshot().pods) == {"u-1"}  # the last good content is kept meanwhile
        f.write(whole[len(whole) // 2 :])
    eventually(lambda: set(store.snapshot().pods) == {"u-2"})


def test_a_burst_of_writes_is_gathered(tmp_path: Path, source: tuple[ObjectsDirSource, PodStore]) -> None:
    src, store = source
    loads = src.loads
    for i in range(100):
        (tmp_path / f"p{i}.json").write_text(json.dumps(pod(f"p{i}", f"u{i}")))
    eventually(lambda: len(store.snapshot().pods) == 100)
    assert src.loads - loads < 20, f"{src.loads - loads} loads for one burst of 100 files"


def test_a_directory_moved_away_and_back_is_watched_again(tmp_path: Path) -> None:
    d = tmp_path / "objects"
    d.mkdir()
    events = DirEvents.open(str(d))
    assert events is not None
    try:
        (d / "x.json").write_text("{}")
        assert events.wait(1.0) == {"x.json"}
        assert events.wait(0.05) == set()
        os.rename(d, tmp_path / "away")
        assert events.wait(1.0) is None and not events.watching  # lost: look at everything
        os.rename(tmp_path / "away", d)
        while events.wait(0.05) is None:  # the move back is one more "look at everything"
            pass
        assert events.watching
        (d / "y.json").write_text("{}")
        assert events.wait(1.0) == {"y.json"}
    finally:
        events.close()
