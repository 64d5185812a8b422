"""Drift checks on nft hosts decided by the netns' nf_tables ruleset generation, on real rules.

Proves: the generation of a pod netns is stable across reads (iptables-nft-save) and traffic and moves
with every change; an unchanged pod is then checked without spawning anything; a flushed chain, a
deleted jump or a foreign rule moves the generation, so the iptables-save compare runs, reports it, and
after the repair the checks are in-process again; the calling thread never leaves its netns. An
ambient apply the agent wrote itself (fresh batches only, nothing else committed meanwhile) is recorded
without a read-back; any other commit in that window, ours or not, means the full compare. A sidecar
pod's write still unchanged at its removal is deleted in-process (its tables), a changed one goes through
iptables-restore and keeps what others added. So is an ambient pod's, with its policy routing.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence

import pytest
from node_agent.backends.base import PodTarget
from node_agent.backends.iptables import fresh_remove
from node_agent.backends.iptables.backend import IptablesBackend
from node_agent.backends.iptables.in_process_commands import IN_PROCESS, RESTORES
from node_agent.backends.iptables.iptc_check import CheckStats, DriftShortcut
from node_agent.backends.iptables.nft_generation import NftGenerationReader, read_generation, read_here
from node_agent.kernel import policy_routes_write
from node_agent.kernel.netns_spawn import InNetnsSpawner
from node_agent.serve.sidecar_apply import apply_for_add

from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.kernel import iptables_run, spawn, tables, tproxy
from cni.kernel.iptables_run import restore_argv
from cni.kernel.netns import entered
from cni.kernel.nft_commit import declined_here
from tests.harness.bare_netns import ambient_routing
from tests.harness.netns import NetNS

pytestmark = pytest.mark.kernel

AMBIENT = AmbientSpec()
SIDECAR = SidecarSpec()


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


# -- an apply the agent wrote itself: its first check is a generation read -------------------------------


@pytest.fixture
def agent_runner() -> Iterator[None]:
    """The agent's command runner (fresh texts written in-process, `nft_fresh_write`)."""
    previous = spawn.install_runner(InNetnsSpawner(IN_PROCESS, RESTORES))
    try:
        yield
    finally:
        spawn.install_runner(previous)


def nft_backend() -> tuple[IptablesBackend, CheckStats]:
    backend = IptablesBackend("nft", in_process_check=False)
    stats = CheckStats()
    backend.shortcut = DriftShortcut(NftGenerationReader(), stats)
    return backend, stats


@pytest.mark.parametrize("ips", [("10.5.0.2",), ("10.5.0.2", "fd00:5::2")], ids=["v4", "dual"])
def test_rules_the_agent_wrote_itself_are_not_read_back(ns: NetNS, agent_runner: None, ips: tuple[str, ...]) -> None:
    """An ambient enrolment: every commit between the generation reads around the apply was one of the
    agent's fresh batches (one per family, into tables that did not exist), so the first check is a
    generation read, no save; a change after the apply is still caught. A second apply (our tables are
    there: save → transition) is read back as before."""
    subprocess.run(["ip", "-n", ns.name, "link", "set", "lo", "up"], check=True)
    backend, stats = nft_backend()
    target = PodTarget(uid="u1", namespace="default", name="web", netns_path=ns.path, ips=ips)
    backend.apply(target, AMBIENT)
    assert backend.shortcut is not None and backend.shortcut.recorded(ns.path)
    assert backend.check(target, AMBIENT) == []
    assert stats.snapshot() == {"in_process": 1, "iptables_save": 0, "read_errors": 0}
    ipt(ns, "-t", "nat", "-F", "HEADRACE_AM_OUTPUT")
    assert backend.check(target, AMBIENT), "a flushed chain after a recorded apply went unseen"
    assert stats.snapshot()["iptables_save"] == 1
    backend.apply(target, AMBIENT)
    assert not backend.shortcut.recorded(ns.path)
    assert backend.check(target, AMBIENT) == []
    assert stats.snapshot()["iptables_save"] == 2


def test_a_commit_by_anyone_else_during_the_apply_means_a_read_back(ns: NetNS) -> None:
    """Right after the agent's own batch (inside the same apply) someone flushes our chain: the generation
    moved by one more than the agent committed, so nothing is recorded and the first check, the full
    compare, reports the flushed chain."""
    key = tuple(restore_argv("nft", 4))

    def write_then_tamper(text: str) -> str | None:
        declined = RESTORES[key](text)
        subprocess.run(["iptables-nft", "-t", "nat", "-F", "HEADRACE_AM_OUTPUT"], check=True, capture_output=True)
        return declined  # type: ignore[return-value]

    previous = spawn.install_runner(InNetnsSpawner(IN_PROCESS, {**RESTORES, key: write_then_tamper}))
    try:
        backend, stats = nft_backend()
        target = PodTarget(uid="u1", namespace="default", name="web", netns_path=ns.path, ips=("10.5.0.2",))
        backend.apply(target, AMBIENT)
        assert backend.shortcut is not None and not backend.shortcut.recorded(ns.path)
        assert backend.check(target, AMBIENT)
        assert stats.snapshot()["iptables_save"] == 1
    finally:
        spawn.install_runner(previous)


@pytest.mark.parametrize("before", ["our-tables", "foreign-chain", "foreign-table"])
def test_an_apply_that_was_not_only_fresh_writes_means_a_read_back(ns: NetNS, agent_runner: None, before: str) -> None:
    """Tables of iptables-nft already there (the batch is refused, iptables-nft-restore puts the rules in)
    or a foreign base chain the apply removes first: more commits than fresh batches; any other table
    (here one whose chain runs after ours, no drift): not only iptables-nft's and ours. No record either
    way; the first check is the full compare and finds the rules intact."""
    if before == "our-tables":
        ipt(ns, "-t", "nat", "-A", "POSTROUTING", "-p", "udp", "-j", "ACCEPT")
    else:
        prio = -110 if before == "foreign-chain" else 10
        chain = f"chain out {{ type nat hook output priority {prio}; tcp dport 80 accept; }};"
        subprocess.run(["nsenter", f"--net={ns.path}", "nft", "-f", "-"], check=True, text=True,
                       input=f"table ip other {{ {chain} }}\n")
    backend, stats = nft_backend()
    target = PodTarget(uid="u1", namespace="default", name="web", netns_path=ns.path, ips=("10.5.0.2",))
    backend.apply(target, AMBIENT)
    assert backend.shortcut is not None and not backend.shortcut.recorded(ns.path)
    assert backend.check(target, AMBIENT) == []
    assert stats.snapshot()["iptables_save"] == 1


# -- removing what the agent wrote itself: its tables deleted in-process -----------------------------------


def nft_tables(ns: NetNS) -> list[str]:
    out = subprocess.run(["nsenter", f"--net={ns.path}", "nft", "list", "tables"], check=True, capture_output=True,
                         text=True).stdout
    return out.split("\n")[:-1]


def ours_saved(ns: NetNS) -> list[str]:
    """Our lines in the netns' iptables-nft rules, both families."""
    out = [subprocess.run(["nsenter", f"--net={ns.path}", f"ip{v}tables-nft-save"], check=True, capture_output=True,
                          text=True).stdout for v in ("", "6")]
    return [line for text in out for line in text.splitlines() if "HEADRACE" in line]


def fresh_write(backend: IptablesBackend, target: PodTarget, spec: SidecarSpec | AmbientSpec) -> None:
    """The agent's first apply of a pod: a sidecar's warm ADD or an ambient enrolment (policy routing too)."""
    if isinstance(spec, SidecarSpec):
        apply_for_add(backend, target, spec)
    else:
        backend.apply_after(target, spec, None)


@pytest.mark.parametrize("restarted", [False, True], ids=["applied", "restarted"])
@pytest.mark.parametrize("spec", [SIDECAR, AMBIENT], ids=["sidecar", "ambient"])
@pytest.mark.parametrize("ips", [("10.5.0.2",), ("10.5.0.2", "fd00:5::2")], ids=["v4", "dual"])
def test_a_pods_unchanged_fresh_write_is_removed_in_process(
    ns: NetNS, agent_runner: None, ips: tuple[str, ...], spec: SidecarSpec | AmbientSpec, restarted: bool,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """An apply the agent wrote itself and nobody changed since (the generation recorded), or, after a
    restart, rules found intact in tables that hold nothing else (the ruleset listed in-process): remove
    deletes iptables-nft's tables, in one transaction, and an ambient pod's policy routing over rtnetlink,
    starting no process; the netns is as it was before the apply."""
    subprocess.run(["ip", "-n", ns.name, "link", "set", "lo", "up"], check=True)
    before = nft_tables(ns)
    backend, _ = nft_backend()
    target = PodTarget(uid="u1", namespace="default", name="web", netns_path=ns.path, ips=ips)
    fresh_write(backend, target, spec)
    assert len(ambient_routing(ns.name)) == (2 * len(ips) if spec is AMBIENT else 0)
    assert backend.shortcut is not None and backend.shortcut.written(ns.path) is not None
    tables = ("nat",) if spec is SIDECAR else ("mangle", "nat")
    assert sorted(nft_tables(ns)) == sorted(before + [f"table {f} {t}" for f in ("ip", "ip6")[: len(ips)]
                                                      for t in tables])
    if restarted:  # a new agent: it knows the pod's rules from its check of them only
        backend, _ = nft_backend()
        assert backend.check(target, spec) == []
        assert backend.shortcut is not None and backend.shortcut.written(ns.path) is None

    def no_process(*_a: object, **_k: object) -> None:
        raise AssertionError("a process was started to remove the rules")

    monkeypatch.setattr(spawn, "run_many", no_process)
    backend.remove(target)
    assert backend.shortcut is not None and not backend.shortcut.recorded(ns.path)
    assert nft_tables(ns) == before and ambient_routing(ns.name) == []


def test_the_warm_adds_record_follows_the_reply_and_a_commit_before_it_records_nothing(
    ns: NetNS, agent_runner: None
) -> None:
    """The warm ADD hands the record to `later` (it runs after the reply): nothing is recorded until it
    runs; run with nobody else's commit between, the write is recorded; with another commit in the netns
    first (here a rule of someone else's), nothing is, and the first check reads the rules back."""
    backend, stats = nft_backend()
    target = PodTarget(uid="u1", namespace="default", name="web", netns_path=ns.path, ips=("10.5.0.2",))
    pending: list[Callable[[], None]] = []
    apply_for_add(backend, target, SIDECAR, pending.append)
    assert backend.shortcut is not None and len(pending) == 1 and not backend.shortcut.recorded(ns.path)
    pending.pop()()
    assert backend.shortcut.written(ns.path) is not None

    other = NetNS.create("hrtest-ngl-")
    try:
        target = PodTarget(uid="u2", namespace="default", name="web", netns_path=other.path, ips=("10.5.0.2",))
        apply_for_add(backend, target, SIDECAR, pending.append)
        ipt(other, "-t", "nat", "-A", "POSTROUTING", "-p", "udp", "-j", "ACCEPT")
        pending.pop()()
        assert not backend.shortcut.recorded(other.path)
        assert backend.check(target, SIDECAR) == [] and stats.snapshot()["iptables_save"] == 1
    finally:
        other.delete()


@pytest.mark.parametrize("restarted", [False, True], ids=["applied", "restarted"])
@pytest.mark.parametrize("spec", [SIDECAR, AMBIENT], ids=["sidecar", "ambient"])
def test_a_changed_netns_is_removed_by_iptables_restore_and_keeps_the_rest(
    ns: NetNS, agent_runner: None, spec: SidecarSpec | AmbientSpec, restarted: bool
) -> None:
    """Someone committed in the netns after our write (here a filter rule of theirs): the tables are not
    ours alone any more (the generation moved; after a restart, the listing shows their rule), so the
    removal takes the usual way, our chains (and routing) out, their rule left."""
    subprocess.run(["ip", "-n", ns.name, "link", "set", "lo", "up"], check=True)
    backend, _ = nft_backend()
    target = PodTarget(uid="u1", namespace="default", name="web", netns_path=ns.path, ips=("10.5.0.2",))
    fresh_write(backend, target, spec)
    ipt(ns, "-t", "nat", "-A", "POSTROUTING", "-p", "udp", "-j", "ACCEPT")
    if restarted:
        backend, _ = nft_backend()
        assert backend.check(target, spec) == []
    backend.remove(target)
    saved = subprocess.run(["nsenter", f"--net={ns.path}", "iptables-nft-save"], check=True,
                           capture_output=True, text=True).stdout
    assert "HEADRACE" not in saved and "-A POSTROUTING -p udp -j ACCEPT" in saved
    assert ambient_routing(ns.name) == []


def test_routing_the_kernel_refuses_to_delete_in_process_is_left_to_the_processes(
    ns: NetNS, agent_runner: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ambient pod's routing cannot be deleted over rtnetlink: its tables stay, and the removal by
    iptables-restore (which finds our chains) and `ip` takes both out."""
    subprocess.run(["ip", "-n", ns.name, "link", "set", "lo", "up"], check=True)
    backend, _ = nft_backend()
    target = PodTarget(uid="u1", namespace="default", name="web", netns_path=ns.path, ips=("10.5.0.2", "fd00:5::2"))
    backend.apply_after(target, AMBIENT, None)
    assert len(ambient_routing(ns.name)) == 4

    def refused(*_a: object, **_k: object) -> None:
        raise OSError(errno.EPERM, "refused")

    monkeypatch.setattr(fresh_remove, "remove_here", refused)
    backend.remove(target)
    assert not ours_saved(ns) and ambient_routing(ns.name) == []


def test_a_delete_made_for_an_older_generation_is_refused_by_the_kernel(ns: NetNS, agent_runner: None) -> None:
    """The delete names the generation its proof was read at: a commit by anyone after that read (here
    between the read and the delete) makes the kernel refuse the whole batch, and every table stays."""
    backend, _ = nft_backend()
    target = PodTarget(uid="u1", namespace="default", name="web", netns_path=ns.path, ips=("10.5.0.2",))
    backend.apply_after(target, AMBIENT, None)
    tables = fresh_remove.tables_of(AMBIENT, (4,))
    assert tables is not None
    with entered(ns.path):
        stale = read_here()
    ipt(ns, "-t", "nat", "-A", "POSTROUTING", "-p", "udp", "-j", "ACCEPT")
    data, acked = fresh_remove.delete_batch(tables, stale)
    with entered(ns.path):
        declined = declined_here(data, acked)
    assert declined is not None and "restarted" in declined
    assert sorted(nft_tables(ns)) == ["table ip mangle", "table ip nat"]
    with entered(ns.path):
        data, acked = fresh_remove.delete_batch(tables, read_here())  # the generation now: taken
        assert declined_here(data, acked) is None
    assert nft_tables(ns) == []


def test_a_commit_between_the_listing_and_the_delete_keeps_the_tables(
    ns: NetNS, agent_runner: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a restart the removal lists the ruleset, finds only ours, and deletes; someone's rule added
    right after the listing makes the kernel refuse that delete, and the removal goes through
    iptables-restore: our chains out, their rule kept."""
    backend, _ = nft_backend()
    target = PodTarget(uid="u1", namespace="default", name="web", netns_path=ns.path, ips=("10.5.0.2",))
    backend.apply_after(target, AMBIENT, None)
    backend, _ = nft_backend()
    assert backend.check(target, AMBIENT) == []
    listed = fresh_remove._not_ours_here

    def listing_then_their_commit(tables: list[tuple[int, str]]) -> str | None:
        why = listed(tables)
        ipt(ns, "-t", "nat", "-A", "POSTROUTING", "-p", "udp", "-j", "ACCEPT")
        return why

    monkeypatch.setattr(fresh_remove, "_not_ours_here", listing_then_their_commit)
    backend.remove(target)
    saved = subprocess.run(["nsenter", f"--net={ns.path}", "iptables-nft-save"], check=True,
                           capture_output=True, text=True).stdout
    assert "HEADRACE" not in saved and "-A POSTROUTING -p udp -j ACCEPT" in saved


class Killed(BaseException):
    """The agent dies here."""


@pytest.mark.parametrize("way", ["in-process", "processes"])
def test_an_agent_killed_between_its_two_steps_leaves_nothing_behind(
    ns: NetNS, agent_runner: None, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    """An ambient pod's removal is two steps, its routing and its chains (in-process, or, when the tables
    hold a rule of someone else's, iptables-restore and ip); the agent dies after the first: the next
    agent (no record of the pod) still finds our chains, which tell its removal to take the routing too.
    No rule, route or chain of ours is left (chains first, it would find none and leave the routing)."""
    subprocess.run(["ip", "-n", ns.name, "link", "set", "lo", "up"], check=True)
    backend, _ = nft_backend()
    target = PodTarget(uid="u1", namespace="default", name="web", netns_path=ns.path, ips=("10.5.0.2", "fd00:5::2"))
    backend.apply_after(target, AMBIENT, None)
    if way == "processes":
        ipt(ns, "-t", "nat", "-A", "POSTROUTING", "-p", "udp", "-j", "ACCEPT")
    steps: list[str] = []

    def step(name: str, real: Callable[..., object]) -> Callable[..., object]:
        def run(*args: object, **kwargs: object) -> object:
            steps.append(name)
            if len(steps) > 1:
                raise Killed
            return real(*args, **kwargs)
        return run

    with monkeypatch.context() as m:
        if way == "in-process":
            m.setattr(fresh_remove, "remove_here", step("routing", policy_routes_write.remove_here))
            m.setattr(fresh_remove, "declined_here", step("chains", declined_here))
        else:
            m.setattr(tproxy, "remove_routes", step("routing", tproxy.remove_routes))
            m.setattr(tables, "restore_many", step("chains", iptables_run.restore_many))
        with pytest.raises(Killed):
            backend.remove(target)
    assert steps == ["routing", "chains"]
    restarted, _ = nft_backend()
    restarted.remove(target)
    assert not ours_saved(ns) and ambient_routing(ns.name) == []
