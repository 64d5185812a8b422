"""The plugin's log lines reach the agent's log through `cni-log.sock` next to the log file; without a
listener they go to the file, which is rotated once it passes its bound."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from node_agent.serve.plugin_logs import PluginLogListener, relog, socket_path

from cni.plugin import log as plugin_log
from cni.plugin.log import JsonLog


def wait_for(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_lines_go_to_the_agent_log_not_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    listener = PluginLogListener(socket_path(tmp_path))
    listener.start()
    try:
        with caplog.at_level(logging.INFO, logger="headrace.cni"):
            jl = JsonLog(str(tmp_path / "cni.log"), "info", pod="web", namespace="shop", cmd="ADD")
            jl.info("sidecar", "redirect applied", families=["ipv4"])
            jl.debug("noise", "below the threshold")
            wait_for(lambda: listener.received == 1)
        rec = next(r for r in caplog.records if r.name == "headrace.cni")
        assert rec.getMessage() == "redirect applied"
        assert rec.__dict__["pod"] == "web" and rec.__dict__["step"] == "sidecar"
        assert rec.__dict__["source"] == "headrace-cni" and rec.__dict__["families"] == '["ipv4"]'
        assert not (tmp_path / "cni.log").exists()
        assert (tmp_path / "cni-log.sock").stat().st_mode & 0o777 == 0o600
    finally:
        listener.stop()
    assert not (tmp_path / "cni-log.sock").exists()


def test_without_agent_the_file_gets_the_line(tmp_path: Path) -> None:
    JsonLog(str(tmp_path / "cni.log"), "info", pod="web").error("add", "failed", code=102)
    line = json.loads((tmp_path / "cni.log").read_text())
    assert line["msg"] == "failed" and line["code"] == 102 and line["pod"] == "web"


def test_fallback_file_is_rotated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plugin_log, "MAX_LOG_BYTES", 2000)
    jl = JsonLog(str(tmp_path / "cni.log"), "info")
    for i in range(100):
        jl.info("step", f"line {i}", filler="x" * 50)
    assert (tmp_path / "cni.log").stat().st_size <= 2000
    assert 1800 < (tmp_path / "cni.log.1").stat().st_size <= 2000
    assert not (tmp_path / "cni.log.2").exists()
    last = (tmp_path / "cni.log").read_text().splitlines()[-1]
    assert json.loads(last)["msg"] == "line 99"


def test_relog_refuses_what_is_not_a_json_object(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="headrace.cni"):
        assert not relog(b"not json")
        assert not relog(b"[1, 2]")
        assert relog(b'{"msg": "m", "level": "warning", "name": "clash", "bad key": 1, "_x": 2}')
    rec = caplog.records[-1]
    assert rec.levelno == logging.WARNING and rec.name == "headrace.cni"
    assert "bad key" not in rec.__dict__ and "_x" not in rec.__dict__


def test_flood_is_bounded_and_never_blocks(tmp_path: Path) -> None:
    """A busy agent never blocks the plugin: a full queue sends the rest of the run's lines to the file;
    the agent re-logs at most max_per_second lines a second and counts the others."""
    listener = PluginLogListener(socket_path(tmp_path), max_per_second=5)
    listener.start()
    try:
        jl = JsonLog(str(tmp_path / "cni.log"), "info")
        started = time.monotonic()
        for i in range(50):
            jl.info("s", f"l{i}")
        assert time.monotonic() - started < 1.0

        def in_file() -> int:
            path = tmp_path / "cni.log"
            return len(path.read_text().splitlines()) if path.exists() else 0

        wait_for(lambda: listener.received + listener.dropped + in_file() == 50)
        assert listener.received <= 10
    finally:
        listener.stop()
