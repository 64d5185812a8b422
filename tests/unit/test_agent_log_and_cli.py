from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from click.testing import CliRunner
from node_agent.agent import log as agent_log
from node_agent.commands.agent import agent


def test_json_lines_with_context() -> None:
    buf = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    agent_log.setup("debug", buf)
    try:
        logging.getLogger("headrace.agent.test").info(
            "pod %s enrolled", "web", extra={"pod": "web", "namespace": "app", "netns": "/x", "step": "enrolled"}
        )
        logging.getLogger("pyroute2.netlink").debug("chatter")
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_level)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["msg"] == "pod web enrolled" and rec["level"] == "info"
    assert (rec["pod"], rec["namespace"], rec["netns"], rec["step"]) == ("web", "app", "/x", "enrolled")
    assert rec["ts"].endswith("Z")


def test_agent_command_rejects_bad_settings(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(agent, [])
    assert out.exit_code == 2 and "exactly one pod source" in out.output
    out = runner.invoke(agent, ["--objects-dir", str(tmp_path), "--exclude-namespaces", "Bad_NS"])
    assert out.exit_code == 2 and "not a valid namespace" in out.output
    out = runner.invoke(agent, ["--kubeconfig", str(tmp_path / "nope")])
    assert out.exit_code == 2
