"""Pooled netns threads: jobs run inside the named netns, workers are reused, the caller never moves."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from node_agent.kernel.netns_runner import NetnsRunner

from cni.kernel.netns import NetnsThreadTimeout


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"hrrun-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def interfaces() -> list[str]:
    return sorted(name for _i, name in socket.if_nameindex())


def test_jobs_run_inside_and_workers_are_reused(netns: str) -> None:
    runner = NetnsRunner()
    own = os.stat("/proc/thread-self/ns/net").st_ino
    for _ in range(20):
        assert runner.run(netns, interfaces, timeout=5) == ["lo"]
        inode = runner.run(netns, lambda: os.stat("/proc/thread-self/ns/net").st_ino, timeout=5)
        assert inode == os.stat(netns).st_ino != own
    assert runner.started == 1  # one thread served all 40 jobs
    assert os.stat("/proc/thread-self/ns/net").st_ino == own
    assert "lo" in interfaces() and len(interfaces()) >= 1


def test_errors_reach_the_caller_and_the_worker_goes_on(netns: str) -> None:
    runner = NetnsRunner()

    def boom() -> None:
        raise ValueError("bad reply")

    with pytest.raises(ValueError, match="bad reply"):
        runner.run(netns, boom, timeout=5)
    with pytest.raises(FileNotFoundError):
        runner.run("/run/netns/hrrun-does-not-exist", interfaces, timeout=5)
    assert runner.run(netns, interfaces, timeout=5) == ["lo"]
    assert runner.started == 1


def test_a_job_past_its_timeout_abandons_its_worker(netns: str) -> None:
    runner = NetnsRunner()
    release = threading.Event()
    with pytest.raises(NetnsThreadTimeout):
        runner.run(netns, lambda: release.wait(10), timeout=0.2)
    assert runner.run(netns, interfaces, timeout=5) == ["lo"]  # served by a new worker
    assert runner.started == 2
    release.set()
    time.sleep(0.2)
    assert runner.run(netns, interfaces, timeout=5) == ["lo"]
    assert runner.started == 2  # the abandoned worker ended instead of coming back


def test_concurrent_callers_get_their_own_workers(netns: str) -> None:
    runner = NetnsRunner(max_idle=4)
    barrier = threading.Barrier(4)
    out: list[list[str]] = []

    def job() -> list[str]:
        barrier.wait(5)
        return interfaces()

    threads = [threading.Thread(target=lambda: out.append(runner.run(netns, job, timeout=10))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert out == [["lo"]] * 4
    assert runner.started == 4
