"""The x_tables change count on the real kernel (`bpf_watch.XT_WATCH`): a replace of a legacy iptables table by
another process moves it, through setsockopt(2) or an io_uring socket command; the watching process's own
replaces, reads and iptables-nft writes do not; while an io_uring command is in flight the count is not
trusted (None) and it moves once the command has run."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from node_agent.backends.ebpf import loader
from node_agent.backends.ebpf.bpf_watch import XT_WATCH, BpfWatch
from node_agent.backends.iptables.xt_fresh_write import SO_SET_REPLACE

from cni.kernel.netns import entered
from tests.harness.netns import NetNS
from tests.kernel.uring_flush import flush_payload

pytestmark = pytest.mark.kernel

TRIES = 5
RULE = ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001"]


@pytest.fixture
def watch(tmp_path: Path) -> Iterator[BpfWatch]:
    w = BpfWatch.start(loader.compile_object(), tmp_path, XT_WATCH)
    try:
        yield w
    finally:
        w.close()


def redirects(ns: NetNS) -> int:
    return ns.run(["iptables-legacy-save", "-t", "nat"]).stdout.count("REDIRECT")


def not_counted(watch: BpfWatch, action: Callable[[], object]) -> bool:
    """Whether `action` leaves the count as it was, in one of TRIES attempts (another process on the machine
    may replace a legacy table meanwhile)."""
    for _ in range(TRIES):
        before = watch.generation()
        action()
        if watch.generation() == before:
            return True
    return False


def test_replaces_by_other_processes_count_and_the_watchers_own_reads_and_nft_writes_do_not(
        watch: BpfWatch, ns: NetNS, tmp_path: Path) -> None:
    start = watch.generation()
    assert start is not None
    mounts = Path("/proc/mounts").read_text().splitlines()
    assert not any("tracefs" in line and str(tmp_path) in line for line in mounts)  # read, unmounted
    ns.run(["iptables-legacy", *RULE])
    after_v4 = watch.generation()
    assert after_v4 is not None and after_v4 > start
    ns.run(["ip6tables-legacy", "-t", "mangle", "-A", "OUTPUT", "-j", "RETURN"])
    after_v6 = watch.generation()
    assert after_v6 is not None and after_v6 > after_v4
    assert not_counted(watch, lambda: ns.run(["iptables-legacy-save"]))
    assert not_counted(watch, lambda: ns.run(["iptables-nft", *RULE]))
    with entered(ns.path):  # the watching process's own replace (the agent's writes are its own to verify)
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with sock:
        assert not_counted(watch, lambda: sock.setsockopt(socket.IPPROTO_IP, SO_SET_REPLACE,
                                                          flush_payload(sock, "nat").raw[:-1]))
    assert redirects(ns) == 0


def test_an_io_uring_replace_counts_and_the_count_is_untrusted_while_it_is_in_flight(
        watch: BpfWatch, ns: NetNS) -> None:
    ns.run(["iptables-legacy", *RULE])
    before = watch.generation()
    assert before is not None and redirects(ns) == 1
    flush = subprocess.Popen([sys.executable, "-m", "tests.kernel.uring_flush", ns.path, "nat", "--after-stdin"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert flush.stdout is not None and flush.stdin is not None
        assert flush.stdout.readline() == b"submitted\n"
        assert watch.generation() is None  # submitted, not run yet: a read now could miss it
        assert redirects(ns) == 1
        flush.stdin.write(b"x")
        flush.stdin.flush()
        assert flush.wait(10) == 0
    finally:
        flush.kill()
        flush.wait()
    after = watch.generation()
    assert redirects(ns) == 0  # flushed without a setsockopt(2) ...
    assert after is not None and after > before  # ... and counted
