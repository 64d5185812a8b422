"""The nf_tables table dump and what leans on it, on real netns.

Proves: a new netns lists no table, and tables made by nft and by iptables-nft are listed with their
family; the foreign-chain read answers "none" for a netns with no table without running libnftables,
and still finds a foreign chain where there is one; the libnftables contexts the agent makes leave no
socket behind (a socket kept in a pod netns would keep that netns alive), those of a table's removal once
the closer thread freed them.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import threading

import pytest
from node_agent.backends import nft_foreign
from node_agent.backends.base import PodTarget
from node_agent.backends.nft_table_dump import tables_here
from node_agent.backends.nftables import libnft
from node_agent.backends.nftables.backend import NftablesBackend
from node_agent.kernel.netns_runner import run_in_netns
from node_agent.lab.agent_run import wait_for

from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.kernel.netns import entered
from tests.harness.netns import NetNS

pytestmark = pytest.mark.kernel
SIOCGSKNS = 0x894C  # a socket's network namespace, as a new fd


def in_ns(ns: NetNS, *argv: str) -> None:
    subprocess.run(["nsenter", f"--net={ns.path}", *argv], check=True, capture_output=True)


def socket_netns() -> list[int]:
    """The netns inode of every socket this process holds."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            ns_fd = fcntl.ioctl(int(fd), SIOCGSKNS)
        except OSError:
            continue
        try:
            out.append(os.fstat(ns_fd).st_ino)
        finally:
            os.close(ns_fd)
    return out


def test_tables_are_listed_with_their_family(ns: NetNS) -> None:
    assert run_in_netns(ns.path, tables_here) == []
    in_ns(ns, "nft", "add table inet somebody")
    in_ns(ns, "iptables-nft", "-t", "nat", "-N", "MINE")
    assert sorted(run_in_netns(ns.path, tables_here)) == [("inet", "somebody"), ("ip", "nat")]


def test_a_netns_without_tables_is_not_read_and_a_foreign_chain_is_still_found(
    ns: NetNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_libnft(*_args: object) -> str:
        raise AssertionError("the ruleset was read")

    with monkeypatch.context() as m:
        m.setattr(nft_foreign, "_in_process", no_libnft)
        assert nft_foreign.read(ns.path, (4,)) == []
    in_ns(ns, "nft", "add table inet somebody")
    in_ns(ns, "nft", "add chain inet somebody early { type filter hook prerouting priority -300; }")
    in_ns(ns, "nft", "add rule inet somebody early notrack")
    found = nft_foreign.read(ns.path, (4,))
    assert [(c.table, c.name, c.priority, c.rules) for c in found] == [("somebody", "early", -300, 1)]


def test_libnftables_contexts_leave_no_socket_in_a_pod_netns(ns: NetNS) -> None:
    pod = os.stat(ns.path).st_ino
    before = sorted(socket_netns())
    with entered(ns.path):
        for json in (False, True) * 10:
            (result,) = libnft.run_in_netns(None, ["list ruleset"], json=json)
            assert result.rc == 0 and (result.output.startswith('{"nftables"') if json else result.output == "")
    after = sorted(socket_netns())
    assert pod not in after and after == before


def test_a_removed_tables_context_is_freed_in_the_background(ns: NetNS) -> None:
    """A remove (and a replace) deletes a table: its context is freed on the closer thread, after the
    operation has returned, and then leaves no socket in the pod netns either."""
    pod = os.stat(ns.path).st_ino
    backend = NftablesBackend()
    target = PodTarget("u1", "default", "p", ns.path, pod, ("10.9.0.2",))
    backend.apply(target, SidecarSpec())
    backend.apply(target, AmbientSpec())  # replaces the table
    backend.remove(target)
    assert backend.listing(target) is None
    wait_for(lambda: pod not in socket_netns(), 10, "the contexts freed")
    # the closer thread (started by a thread inside the pod netns) lives in the process' own netns
    own = os.stat("/proc/self/ns/net").st_ino
    away = [t for t in os.listdir("/proc/self/task") if thread_netns(t) not in (own, None)]
    names = {str(t.native_id): t.name for t in threading.enumerate()}
    assert [names.get(t, t) for t in away] == []


def thread_netns(tid: str) -> int | None:
    try:
        return os.stat(f"/proc/self/task/{tid}/ns/net").st_ino
    except FileNotFoundError:
        return None
