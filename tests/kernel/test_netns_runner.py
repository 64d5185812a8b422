"""Pooled netns threads: jobs run inside the named netns, workers are reused, the caller never moves, a
worker lives in the agent's netns whichever thread started it; the agent's command runner starts
commands inside a netns from such a thread instead of through nsenter."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence

import pytest
from node_agent.backends.iptables.in_process_commands import IN_PROCESS, RESTORES
from node_agent.kernel.netns_runner import NetnsRunner, staying_in
from node_agent.kernel.netns_spawn import InNetnsSpawner, Refused

from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.kernel import spawn
from cni.kernel import tables as netns_tables
from cni.kernel.iptables_run import netns_argv
from cni.kernel.netns import NetnsThreadTimeout
from cni.kernel.tproxy import add_routes, check_routes, undo_routes
from cni.rules.tproxy_routes import AMBIENT, route_line


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"hrrun-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The programs the runner starts (`spawn.spawn_many`), in order; in-process commands are not there."""
    names: list[str] = []
    real = spawn.spawn_many

    def recording(jobs: Sequence[tuple[Sequence[str], str | None]], timeout: float) -> list[spawn.Result]:
        names.extend(argv[0] for argv, _ in jobs)
        return real(jobs, timeout)

    monkeypatch.setattr(spawn, "spawn_many", recording)
    return names


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


# ---------------------------------------------------------------- commands started inside the netns


def _netns_of_child(spawner: InNetnsSpawner, netns: str) -> str:
    (res,) = spawner.run_many([(netns_argv(netns, ["readlink", "/proc/self/ns/net"]), None)], 10)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_commands_are_born_in_the_netns_without_nsenter(netns: str) -> None:
    """The agent's runner takes the nsenter wrapper off and starts the command from a thread inside the
    netns: it runs there (not in the caller's netns), several at once, stdin fed, output collected."""
    spawner = InNetnsSpawner()
    assert _netns_of_child(spawner, netns) == f"net:[{os.stat(netns).st_ino}]"
    text = "hello\n" * 10000
    jobs = [(netns_argv(netns, ["cat"]), text), (netns_argv(netns, ["ip", "-o", "link", "show"]), None),
            (netns_argv(netns, ["sh", "-c", "exit 3"]), None)]
    cat, links, failed = spawner.run_many(jobs, 10)
    assert (cat.returncode, cat.stdout) == (0, text)
    assert links.returncode == 0 and links.stdout.count("\n") == 1 and ": lo:" in links.stdout
    assert failed.returncode == 3
    plain = spawner.run_many([(["readlink", "/proc/self/ns/net"], None)], 10)[0]  # no wrapper: here
    assert plain.stdout.strip() == os.readlink("/proc/self/ns/net")


def test_iptables_restore_lands_in_the_pod_netns_only(netns: str) -> None:
    spawner = InNetnsSpawner()
    text = "*nat\n:HRTEST-CHAIN - [0:0]\nCOMMIT\n"
    (res,) = spawner.run_many([(netns_argv(netns, ["iptables-legacy-restore", "--noflush"]), text)], 10)
    assert res.returncode == 0, res.stderr
    (saved,) = spawner.run_many([(netns_argv(netns, ["iptables-legacy-save", "-t", "nat"]), None)], 10)
    assert ":HRTEST-CHAIN" in saved.stdout
    here = subprocess.run(["iptables-legacy-save", "-t", "nat"], capture_output=True, text=True, check=False)
    assert "HRTEST-CHAIN" not in here.stdout


def test_a_netns_that_cannot_be_entered_fails_each_command_like_nsenter() -> None:
    gone = "/run/netns/hrrun-does-not-exist"
    results = InNetnsSpawner().run_many([(netns_argv(gone, ["true"]), None), (netns_argv(gone, ["true"]), "x")], 5)
    assert [r.returncode for r in results] == [1, 1]
    assert all(r.stderr.startswith(f"nsenter: cannot enter {gone}:") for r in results)


def test_a_missing_binary_raises_and_mixed_batches_still_run(netns: str) -> None:
    spawner = InNetnsSpawner()
    with pytest.raises(FileNotFoundError):
        spawner.run_many([(netns_argv(netns, ["headrace-no-such-binary"]), None)], 5)
    other = f"/proc/{os.getpid()}/ns/net"  # two netns in one batch: started as they are, through nsenter
    a, b = spawner.run_many([(netns_argv(netns, ["readlink", "/proc/self/ns/net"]), None),
                             (netns_argv(other, ["readlink", "/proc/self/ns/net"]), None)], 10)
    assert a.stdout.strip() == f"net:[{os.stat(netns).st_ino}]"
    assert b.stdout.strip() == os.readlink("/proc/self/ns/net")


def test_the_sidecar_passthrough_address_is_added_without_a_process(netns: str, started: list[str]) -> None:
    """A dual-stack sidecar apply through the agent's runner: the iptables restores are processes, `::6`
    on lo is an rtnetlink request from the thread inside the netns; a failure reads like `ip`'s."""
    previous = spawn.install_runner(InNetnsSpawner(IN_PROCESS))
    try:
        subprocess.run(["ip", "-n", os.path.basename(netns), "link", "set", "lo", "up"], check=True)
        netns_tables.apply_sidecar(netns, SidecarSpec(), (4, 6), "legacy", optimistic=True)
    finally:
        spawn.install_runner(previous)
    assert sorted(started) == ["ip6tables-legacy-restore", "iptables-legacy-restore"]
    addrs = subprocess.run(["ip", "-n", os.path.basename(netns), "-6", "addr", "show", "dev", "lo"],
                           capture_output=True, text=True, check=True).stdout
    assert "inet6 ::6/128" in addrs
    saved = subprocess.run(["ip", "netns", "exec", os.path.basename(netns), "ip6tables-legacy-save", "-t", "nat"],
                           capture_output=True, text=True, check=True).stdout
    assert "-A OUTPUT -p tcp" in saved and "HEADRACE_SC_OUTPUT" in saved
    subprocess.run(["ip", "-n", os.path.basename(netns), "link", "set", "lo", "down"], check=True)
    key = next(iter(IN_PROCESS))
    (res,) = InNetnsSpawner(IN_PROCESS).run_many([(netns_argv(netns, list(key)), None)], 5)
    assert res.returncode in (0, 2)  # an address on a down lo: accepted or refused, never a crash
    if res.returncode:
        assert res.stderr.startswith("RTNETLINK answers:")


def test_restorers_do_the_work_or_the_command_is_started(netns: str, started: list[str]) -> None:
    """A restorer that did the work: nothing started, exit 0; one that declines (changing nothing) or
    raises: the command is started after all, with its stdin."""
    seen: list[str] = []

    def done(text: str) -> None:
        seen.append(text)

    def declined(text: str) -> str | None:
        return "not mine"

    def boom(text: str) -> str | None:
        raise RuntimeError("a bug")

    spawner = InNetnsSpawner(restorers={("cat",): done, ("tee", "/dev/null"): declined, ("wc", "-c"): boom})
    a, b, c = spawner.run_many([(netns_argv(netns, ["cat"]), "one"), (netns_argv(netns, ["tee", "/dev/null"]), "two"),
                                (netns_argv(netns, ["wc", "-c"]), "three")], 10)
    assert seen == ["one"] and (a.returncode, a.stdout) == (0, "")
    assert (b.returncode, b.stdout) == (0, "two") and (c.returncode, c.stdout.strip()) == (0, "5")
    assert started == ["tee", "wc"]


@pytest.mark.parametrize("flavour", ["legacy", "nft"])
def test_a_sidecar_apply_into_a_new_netns_starts_no_process(netns: str, started: list[str], flavour: str) -> None:
    """The agent's runner with its restorers: a dual-stack sidecar ADD's rules are put in by the agent
    itself (legacy: `xt_fresh_write`, nft: `nft_fresh_write`), `::6` too; a second apply (our chains are
    there) goes through iptables-save and -restore as before."""
    previous = spawn.install_runner(InNetnsSpawner(IN_PROCESS, RESTORES))
    try:
        netns_tables.apply_sidecar(netns, SidecarSpec(), (4, 6), flavour, optimistic=True)  # type: ignore[arg-type]
        assert started == []
        netns_tables.apply_sidecar(netns, SidecarSpec(), (4, 6), flavour, optimistic=True)  # type: ignore[arg-type]
        assert sorted(started) == sorted(f"{t}-{flavour}-{what}" for t in ("iptables", "ip6tables")
                                         for what in ("restore", "save"))
        assert netns_tables.installed(netns, flavour)  # type: ignore[arg-type]
        assert netns_tables.check_sidecar(netns, SidecarSpec(), (4, 6), flavour) == []  # type: ignore[arg-type]
    finally:
        spawn.install_runner(previous)


@pytest.mark.parametrize("flavour", ["legacy", "nft"])
def test_an_ambient_apply_into_a_new_netns_starts_no_process(netns: str, started: list[str], flavour: str) -> None:
    """Ambient enrolment through the agent's runner: both tables (mangle and nat) of each family written
    in-process, the policy routing over rtnetlink: nothing started."""
    subprocess.run(["ip", "-n", os.path.basename(netns), "link", "set", "lo", "up"], check=True)
    previous = spawn.install_runner(InNetnsSpawner(IN_PROCESS, RESTORES))
    try:
        netns_tables.apply_ambient(netns, AmbientSpec(), (4, 6), flavour, optimistic=True)  # type: ignore[arg-type]
        assert started == []
        assert netns_tables.check_ambient(netns, AmbientSpec(), (4, 6), flavour) == []  # type: ignore[arg-type]
        assert netns_tables.check_ambient_routes(netns, (4, 6)) == []
    finally:
        spawn.install_runner(previous)


def test_a_legacy_ambient_text_the_tables_refuse_is_not_half_applied(netns: str, started: list[str]) -> None:
    """Legacy, someone else's rule in nat: the in-process write declines (nat is not new) and, the text
    having two tables, iptables-legacy-restore is not started with it (it would commit mangle before
    failing on nat if our chains were there): the save → transition path puts the rules in, beside the
    foreign rule."""
    name = os.path.basename(netns)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "netns", "exec", name, "iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-p", "udp",
                    "-j", "ACCEPT"], check=True)
    previous = spawn.install_runner(InNetnsSpawner(IN_PROCESS, RESTORES))
    try:
        netns_tables.apply_ambient(netns, AmbientSpec(), (4,), "legacy", optimistic=True)
        assert sorted(started) == ["iptables-legacy-restore", "iptables-legacy-save"]  # no fresh restore
        assert netns_tables.check_ambient(netns, AmbientSpec(), (4,), "legacy") == []
    finally:
        spawn.install_runner(previous)
    saved = subprocess.run(["ip", "netns", "exec", name, "iptables-legacy-save", "-t", "nat"], capture_output=True,
                           text=True, check=True).stdout
    assert "-A POSTROUTING -p udp -j ACCEPT" in saved


def test_a_refused_command_fails_without_starting(netns: str, started: list[str]) -> None:
    def refuse(text: str) -> str | None:
        raise Refused("not now")

    (res,) = InNetnsSpawner(restorers={("cat",): refuse}).run_many([(netns_argv(netns, ["cat"]), "x")], 5)
    assert (res.returncode, res.stderr) == (1, "cat: not now\n") and started == []


def test_ambient_routing_in_process_reads_like_ip_and_undoes_only_its_own(netns: str, started: list[str]) -> None:
    """The ambient routing side job through the agent's runner: a rule that was there already fails its
    line with "File exists" as `ip -force -batch` says it (success), and the rollback deletes only the
    route this call added."""
    name = os.path.basename(netns)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "-n", name, "-4", "rule", "add", "pref", "32764", "from", "all", "fwmark", "0x111/0xfff",
                    "lookup", "100"], check=True)
    previous = spawn.install_runner(InNetnsSpawner(IN_PROCESS, RESTORES))
    try:
        (job,) = add_routes(netns, (4,), AMBIENT)
        assert job.added == [route_line("add", 4, AMBIENT)]
        assert check_routes(netns, (4,), AMBIENT) == []
        undo_routes(netns, [job])
    finally:
        spawn.install_runner(previous)
    assert started == ["ip", "ip"]  # the check's `list` and the rollback's `del` batches are started
    rules = subprocess.run(["ip", "-n", name, "-4", "rule", "list", "pref", "32764"], capture_output=True, text=True,
                           check=True).stdout
    routes = subprocess.run(["ip", "-n", name, "-4", "route", "list", "table", "100"], capture_output=True, text=True,
                            check=False).stdout
    assert "fwmark 0x111/0xfff lookup 100" in rules and routes.strip() == ""


def test_a_worker_started_from_inside_a_pod_netns_lives_at_home(netns: str, two: tuple[str, str]) -> None:
    """The first job of a runner handed over by a thread that sits in a pod netns (inside `staying_in` of
    another netns): the new worker goes to the agent's own netns first (a thread starts in its creator's
    netns), runs the job inside the job's netns and comes back home, keeping no pod netns alive."""
    own = os.stat("/proc/self/ns/net").st_ino
    runner = NetnsRunner()
    other = f"/run/netns/{two[0]}"
    with staying_in(other):
        assert runner.run(netns, lambda: os.stat("/proc/thread-self/ns/net").st_ino, timeout=5) == os.stat(
            netns).st_ino
    (worker,) = runner._idle
    assert os.stat(f"/proc/self/task/{worker.thread.native_id}/ns/net").st_ino == own


def test_staying_in_the_netns_the_thread_is_in_enters_nothing(netns: str, two: tuple[str, str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A block for the netns the thread already stays in (a backend applying through another's apply) does
    not enter it again; the outer block still brings the thread home; another netns is entered as ever."""
    from cni.kernel.netns import entered

    entries: list[str | int] = []

    def counting(target: str | int) -> entered:
        entries.append(target)
        return entered(target)

    monkeypatch.setattr("node_agent.kernel.netns_runner.entered", counting)
    here = "/proc/thread-self/ns/net"
    own, inside = os.stat(here).st_ino, os.stat(netns).st_ino
    other = f"/run/netns/{two[0]}"
    with staying_in(netns):
        with staying_in(netns):
            assert os.stat(here).st_ino == inside
        assert os.stat(here).st_ino == inside and entries == [netns]
        with staying_in(other):
            assert os.stat(here).st_ino == os.stat(other).st_ino
        assert os.stat(here).st_ino == inside
    assert os.stat(here).st_ino == own and entries == [netns, other]
