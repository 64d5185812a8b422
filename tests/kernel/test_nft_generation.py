"""Drift checks on nft hosts decided by the netns' nf_tables ruleset generation, on real rules.

Proves: the generation of a pod netns is stable across reads (iptables-nft-save) and traffic and moves
with every change; an unchanged pod is then checked without spawning anything; a flushed chain, a
deleted jump or a foreign rule moves the generation, so the iptables-save compare runs, reports it, and
after the repair the checks are in-process again; the calling thread never leaves its netns.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator, Sequence

import pytest
from node_agent.backends.base import PodTarget
from node_agent.backends.iptables.backend import IptablesBackend
from node_agent.backends.iptables.iptc_check import CheckStats, DriftShortcut
from node_agent.backends.iptables.nft_generation import NftGenerationReader, read_generation

from cni.contract.spec import AmbientSpec
from cni.kernel import spawn
from cni.kernel.netns import entered
from tests.harness.netns import NetNS

pytestmark = pytest.mark.kernel

AMBIENT = AmbientSpec()


@pytest.fixture
def ns() -> Iterator[NetNS]:
    n = NetNS.create("hr-nftgen-")
    try:
        yield n
    finally:
        n.delete()


def ipt(ns: NetNS, *args: str) -> None:
    subprocess.run(["nsenter", f"--net={ns.path}", "iptables-nft", *args], check=True, capture_output=True)


def test_generation_is_stable_across_reads_and_traffic_and_moves_with_changes(ns: NetNS) -> None:
    own = os.stat("/proc/thread-self/ns/net").st_ino
    first = read_generation(ns.path)
    subprocess.run(["nsenter", f"--net={ns.path}", "iptables-nft-save"], check=True, capture_output=True)
    with entered(ns.path):
        srv = socket.create_server(("127.0.0.1", 0))
        client = socket.socket()
    with srv, client:
        client.settimeout(5)
        client.connect(srv.getsockname())
        srv.accept()[0].close()
    assert read_generation(ns.path) == first
    ipt(ns, "-t", "nat", "-N", "SOMETHING")
    assert read_generation(ns.path) > first
    assert os.stat("/proc/thread-self/ns/net").st_ino == own


def test_unchanged_pod_is_checked_without_spawning_and_tampering_is_caught(
    ns: NetNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = IptablesBackend("nft", in_process_check=False)
    stats = CheckStats()
    backend.shortcut = DriftShortcut(NftGenerationReader(), stats)  # own counters
    target = PodTarget(uid="u1", namespace="default", name="web", netns_path=ns.path, ips=("10.5.0.2", "fd00:5::2"))
    backend.apply(target, AMBIENT)
    spawned = [0]
    real = spawn.run_many

    def counting(jobs: Sequence[tuple[Sequence[str], str | None]], timeout: float) -> list[spawn.Result]:
        spawned[0] += len(jobs)
        return real(jobs, timeout)

    monkeypatch.setattr(spawn, "run_many", counting)
    assert backend.check(target, AMBIENT) == []  # the first check is the full compare: 2 saves
    assert spawned[0] == 2
    for _ in range(5):
        assert backend.check(target, AMBIENT) == []
    assert spawned[0] == 2 and stats.snapshot()["in_process"] == 5

    for tamper in (
        ["-t", "nat", "-F", "HEADRACE_AM_OUTPUT"],  # flushed chain
        ["-t", "nat", "-D", "OUTPUT", "1"],  # deleted jump (ours is inserted at the top)
        ["-t", "nat", "-I", "HEADRACE_AM_OUTPUT", "1", "-p", "tcp", "-j", "ACCEPT"],  # a bypass inserted
    ):
        ipt(ns, *tamper)
        full = stats.snapshot()["iptables_save"]
        problems = backend.check(target, AMBIENT)
        assert problems, f"{tamper} not detected"
        assert stats.snapshot()["iptables_save"] == full + 1
        backend.apply(target, AMBIENT)  # the repair
        assert backend.check(target, AMBIENT) == []  # full compare again, records the new generation
        in_process = stats.snapshot()["in_process"]
        assert backend.check(target, AMBIENT) == []
        assert stats.snapshot()["in_process"] == in_process + 1
