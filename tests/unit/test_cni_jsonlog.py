"""The plugin's JSON-lines log (cni.plugin.log)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from cni.plugin.log import JsonLog


def test_one_object_per_line_with_context(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "cni.log"  # the directory is created
    log = JsonLog(str(path), "info", cmd="ADD", netns="/run/netns/p")
    log.bind(pod="web", namespace="shop", container_id="c1")
    log.info("membership", "mode sidecar", mode="sidecar", pod="ignored-extra")
    log.debug("x", "filtered out")
    log.error("error", "bad\nthing", code=101)
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first == {
        "ts": first["ts"],
        "level": "info",
        "msg": "mode sidecar",
        "step": "membership",
        "pod": "web",
        "namespace": "shop",
        "netns": "/run/netns/p",
        "container_id": "c1",
        "cmd": "ADD",
        "mode": "sidecar",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert second["msg"] == "bad\nthing" and second["code"] == 101


def test_level_and_unwritable_file(tmp_path: Path) -> None:
    log = JsonLog(str(tmp_path / "a.log"))
    log.configure(str(tmp_path / "b.log"), "warning")
    log.info("s", "skipped")
    log.warning("s", "kept")
    assert not (tmp_path / "a.log").exists()
    assert len((tmp_path / "b.log").read_text().splitlines()) == 1
    (tmp_path / "file").write_text("")
    JsonLog(str(tmp_path / "file" / "x.log")).error("s", "never raises")  # parent is a file
