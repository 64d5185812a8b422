"""What a test run leaves when it is stopped: SIGTERM tears the running tests' fixtures down; what a
SIGKILLed run's nodes left (their cgroup subtrees and pod processes) the next run removes first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from node_agent.lab.pod_cgroups import CGROUP2_ROOT, remove_tree, sleeper
from node_agent.lab.simnode import NODE_CGROUP_PREFIX, remove_stale_node_cgroups

from tests.harness.netns import NetNS

REPO = Path(__file__).resolve().parents[2]


def test_a_gone_nodes_cgroups_and_pod_processes_are_removed_a_live_nodes_kept() -> None:
    live = NetNS.create("hrnode-")
    stale = CGROUP2_ROOT / f"{NODE_CGROUP_PREFIX}hrnode-gone{os.getpid()}"
    kept = CGROUP2_ROOT / f"{NODE_CGROUP_PREFIX}{live.name}"
    pod = None
    try:
        pod = sleeper(stale / "kubepods" / "podx" / "c1")  # its own fresh netns, like a pod's infra process
        (kept / "headrace-proxy").mkdir(parents=True)
        removed = remove_stale_node_cgroups()
        assert stale in removed and kept not in removed
        assert not stale.exists() and kept.is_dir()
        assert pod.wait(5) == -signal.SIGKILL
    finally:
        if pod is not None and pod.poll() is None:
            pod.kill()
            pod.wait(5)
        remove_tree(stale)
        remove_tree(kept)
        live.delete()


def test_sigterm_tears_the_running_tests_fixtures_down(tmp_path: Path) -> None:
    """A run stopped with SIGTERM (a cancelled CI job) runs its fixtures' teardown, as Ctrl-C does."""
    torn, started = tmp_path / "torn", tmp_path / "started"
    (tmp_path / "test_probe.py").write_text(
        "import pathlib, time\nimport pytest\n\n"
        "@pytest.fixture\ndef held():\n"
        "    try:\n"
        f"        pathlib.Path({str(started)!r}).touch()\n"
        "        yield\n"
        "    finally:\n"
        f"        pathlib.Path({str(torn)!r}).touch()\n\n"
        "def test_long(held):\n    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                             str(tmp_path / "test_probe.py")], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists()
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert torn.exists(), proc.stdout.read().decode() if proc.stdout else ""
