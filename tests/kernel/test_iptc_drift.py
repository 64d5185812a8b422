"""In-process (python-iptables) drift checks on real legacy rules in test netns.

Proves: an unchanged pod is decided in-process without spawning anything (also while traffic bumps the
counters); every kind of tampering (flushed chain, deleted jump, foreign rule inside our chain, altered
rule, deleted chain, duplicated jump, IPv6-only change, new chain of ours) changes the fingerprint, so
the iptables-save compare runs and reports it, and a repair makes the next check in-process again;
reading never creates a legacy table; the calling thread never changes netns, the one reader thread is
back home after every read and ends on close; nft backends never use python-iptables (they use the
ruleset generation: test_nft_generation.py).
"""

from __future__ import annotations

import os
import shlex
import socket
import threading
from collections.abc import Callable, Sequence

import pytest
from node_agent.backends.base import PodTarget, RedirectSpec
from node_agent.backends.iptables import iptc_reader
from node_agent.backends.iptables.backend import IptablesBackend
from node_agent.backends.iptables.iptc_check import CheckStats, DriftShortcut
from node_agent.backends.iptables.xt_digest import XtDigestError, XtDigestReader
from node_agent.kernel import home_netns

from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.kernel import spawn
from cni.kernel.netns import entered
from cni.rules import builder
from tests.harness.netns import NetNS

pytestmark = pytest.mark.kernel

AMBIENT = AmbientSpec()
SIDECAR = SidecarSpec()
IPS = ("10.5.0.2", "fd00:5::2")


@pytest.fixture(scope="module")
def reader() -> iptc_reader.IptcReader:
    r = iptc_reader.shared_reader()
    if not r.wait_ready(60):
        pytest.fail(f"python-iptables does not load: {r.error}")
    return r


class Spawns:
    """Counts processes started through cni.kernel.spawn (every iptables-save/restore goes there)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = spawn.run_many

        def counting(jobs: Sequence[tuple[Sequence[str], str | None]], timeout: float) -> list[spawn.Result]:
            self.count += len(jobs)
            return real(jobs, timeout)

        monkeypatch.setattr(spawn, "run_many", counting)


def make_backend(reader: iptc_reader.IptcReader) -> tuple[IptablesBackend, CheckStats]:
    """The legacy backend as the agent builds it: the xt digest first, then python-iptables."""
    backend = IptablesBackend("legacy", in_process_check=False)
    stats = CheckStats()
    backend.shortcut = DriftShortcut(reader, stats, quick=XtDigestReader())  # own counters (shared process)
    return backend, stats


def target_of(ns: NetNS, ips: tuple[str, ...] = IPS) -> PodTarget:
    return PodTarget(uid="u1", namespace="default", name="web", netns_path=ns.path, ips=ips)


def settle(backend: IptablesBackend, target: PodTarget, spec: RedirectSpec, stats: CheckStats) -> None:
    """Apply, then check until the fingerprint is recorded (first check: full compare, records)."""
    backend.apply(target, spec)
    assert backend.check(target, spec) == []
    assert backend.shortcut is not None and backend.shortcut.recorded(target.netns_path)
    before = stats.snapshot()["in_process"]
    assert backend.check(target, spec) == []
    assert stats.snapshot()["in_process"] == before + 1


def test_unchanged_pod_is_checked_in_process(ns: NetNS, reader: iptc_reader.IptcReader, monkeypatch) -> None:
    backend, stats = make_backend(reader)
    target = target_of(ns)
    backend.apply(target, AMBIENT)
    tables = reader.read(ns.path, (4, 6))
    for family in (4, 6):  # what was read is what the kernel has, table by table, chain by chain
        assert sorted(tables[family]) == ["mangle", "nat"]
        nat = dict(tables[family]["nat"])
        assert list(nat)[:4] == ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"]
        assert [r.target for r in nat["OUTPUT"]] == ["HEADRACE_AM_OUTPUT"]
        assert [r.target for r in nat["HEADRACE_AM_OUTPUT"]] == ["ACCEPT", "ACCEPT", "ACCEPT", "REDIRECT"]
        assert [r.target for r in dict(tables[family]["mangle"])["HEADRACE_AM_PRERT"]] == ["CONNMARK"]
    spawns = Spawns(monkeypatch)
    assert backend.check(target, AMBIENT) == []  # the first check is the full compare: 2 saves
    assert spawns.count == 2 and stats.snapshot() == {"in_process": 0, "iptables_save": 1, "read_errors": 0}
    for _ in range(5):
        assert backend.check(target, AMBIENT) == []
    assert spawns.count == 2  # nothing spawned by the in-process checks
    assert stats.snapshot() == {"in_process": 5, "iptables_save": 1, "read_errors": 0}


def test_traffic_moves_counters_not_the_fingerprint(ns: NetNS, reader: iptc_reader.IptcReader) -> None:
    backend, stats = make_backend(reader)
    target = target_of(ns)
    settle(backend, target, AMBIENT, stats)
    digest = reader.fingerprint(ns.path, (4, 6), "HEADRACE_AM_")
    with entered(ns.path):
        srv = socket.create_server(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        for _ in range(3):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            c.close()
            srv.accept()[0].close()
        srv.close()
    counters = ns.run(["iptables-legacy", "-t", "nat", "-L", "OUTPUT", "-v", "-x", "-n"]).stdout
    jump = next(line for line in counters.splitlines() if "HEADRACE_AM_OUTPUT" in line)
    assert int(jump.split()[0]) >= 3  # the connections went through our jump
    assert reader.fingerprint(ns.path, (4, 6), "HEADRACE_AM_") == digest
    n = stats.snapshot()["in_process"]
    assert backend.check(target, AMBIENT) == []
    assert stats.snapshot()["in_process"] == n + 1


def _purpose(text: str) -> list[str]:
    """The comment match our rules carry (so a tampered rule differs from ours only where intended)."""
    return shlex.split(builder.comment(text))


def _flush(ns: NetNS) -> None:
    ns.run(["iptables-legacy", "-t", "nat", "-F", "HEADRACE_AM_PRERT"])


def _delete_jump(ns: NetNS) -> None:
    ns.run(["iptables-legacy", "-t", "nat", "-D", "OUTPUT", "1"])  # ours is inserted at the top


def _foreign_rule_inside(ns: NetNS) -> None:
    ns.run(["iptables-legacy", "-t", "nat", "-I", "HEADRACE_AM_OUTPUT", "2", "-p", "udp", "-j", "RETURN"])


def _altered_rule(ns: NetNS) -> None:  # same rule, other port: only the REDIRECT target's data differs
    ns.run(["iptables-legacy", "-t", "nat", "-R", "HEADRACE_AM_OUTPUT", "4", "!", "-d", "127.0.0.1/32", "-p", "tcp",
            "-m", "mark", "!", "--mark", "0x539/0xfff", *_purpose("ambient outbound redirect"), "-j", "REDIRECT",
            "--to-ports", "15002"])


def _altered_match(ns: NetNS) -> None:  # same rule, other mark mask: only a match's data differs
    ns.run(["iptables-legacy", "-t", "nat", "-R", "HEADRACE_AM_OUTPUT", "4", "!", "-d", "127.0.0.1/32", "-p", "tcp",
            "-m", "mark", "!", "--mark", "0x539/0xffff", *_purpose("ambient outbound redirect"), "-j", "REDIRECT",
            "--to-ports", "15001"])


def _altered_comment(ns: NetNS) -> None:  # same rule, another purpose: only the comment match's data differs
    ns.run(["iptables-legacy", "-t", "nat", "-R", "HEADRACE_AM_OUTPUT", "4", "!", "-d", "127.0.0.1/32", "-p", "tcp",
            "-m", "mark", "!", "--mark", "0x539/0xfff", *_purpose("ambient outbound redirectz"), "-j", "REDIRECT",
            "--to-ports", "15001"])


def _deleted_chain(ns: NetNS) -> None:
    for argv in (["-D", "PREROUTING", "1"], ["-F", "HEADRACE_AM_PRERT"],
                 ["-X", "HEADRACE_AM_PRERT"]):
        ns.run(["iptables-legacy", "-t", "mangle", *argv])


def _duplicate_jump(ns: NetNS) -> None:
    jump = ["-A", "PREROUTING", *_purpose("ambient prerouting"), "-j", "HEADRACE_AM_PRERT"]
    ns.run(["iptables-legacy", "-t", "nat", *jump])


def _v6_only(ns: NetNS) -> None:
    ns.run(["ip6tables-legacy", "-t", "nat", "-F", "HEADRACE_AM_OUTPUT"])


def _extra_chain_elsewhere(ns: NetNS) -> None:  # a chain of ours in a table we do not use
    ns.run(["iptables-legacy", "-t", "filter", "-N", "HEADRACE_AM_EXTRA"])


def _goto_instead_of_jump(ns: NetNS) -> None:
    ns.run(["iptables-legacy", "-t", "nat", "-R", "PREROUTING", "1", *_purpose("ambient prerouting"), "-g",
            "HEADRACE_AM_PRERT"])


TAMPERING: dict[str, Callable[[NetNS], None]] = {
    "flushed-chain": _flush,
    "deleted-jump": _delete_jump,
    "foreign-rule-inside": _foreign_rule_inside,
    "altered-target": _altered_rule,
    "altered-match": _altered_match,
    "altered-comment": _altered_comment,
    "deleted-chain": _deleted_chain,
    "duplicated-jump": _duplicate_jump,
    "ipv6-only": _v6_only,
    "extra-chain-other-table": _extra_chain_elsewhere,
    "goto-instead-of-jump": _goto_instead_of_jump,
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampering_changes_the_xt_digest_and_traffic_does_not(ns: NetNS, case: str) -> None:
    """The digest asked first on legacy hosts: no tampering can hide behind it; counters do not move it."""
    backend = IptablesBackend("legacy", in_process_check=False)
    backend.apply(target_of(ns), AMBIENT)
    quick = XtDigestReader()
    digest = quick.digest(ns.path, (4, 6))
    with entered(ns.path):
        srv = socket.create_server(("127.0.0.1", 0))
        socket.create_connection(srv.getsockname(), timeout=5).close()
        srv.accept()[0].close()
        srv.close()
    assert quick.digest(ns.path, (4, 6)) == digest
    TAMPERING[case](ns)
    assert quick.digest(ns.path, (4, 6)) != digest


def test_an_unchanged_netns_is_decided_by_the_xt_digest_alone(
    ns: NetNS, reader: iptc_reader.IptcReader, monkeypatch
) -> None:
    backend, stats = make_backend(reader)
    target = target_of(ns)
    settle(backend, target, AMBIENT, stats)

    def no_read(*_args: object) -> bytes:
        raise AssertionError("python-iptables read although nothing changed")

    spawns = Spawns(monkeypatch)
    monkeypatch.setattr(reader, "fingerprint", no_read)
    for _ in range(3):
        assert backend.check(target, AMBIENT) == []
    assert spawns.count == 0
    monkeypatch.undo()
    ns.run(["iptables-legacy", "-t", "nat", "-F", "HEADRACE_AM_OUTPUT"])
    assert backend.check(target, AMBIENT)  # the digest moved: the fingerprint, then the compare


def test_the_xt_digest_creates_no_table_and_reports_what_it_cannot_read(ns: NetNS, tmp_path) -> None:
    quick = XtDigestReader()
    empty = quick.digest(ns.path, (4, 6))
    assert home_netns.at_home()  # read by this thread from inside the pod netns, and back
    assert quick.digest(ns.path, (4, 6)) == empty
    assert ns.run(["iptables-legacy-save"]).stdout.strip() == ""  # no table made by reading
    assert quick.digest(ns.path, (4,)) != empty  # the families are part of it
    with pytest.raises(XtDigestError):
        quick.digest(str(tmp_path / "missing"), (4,))
    assert home_netns.at_home()


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampering_is_detected_and_repaired(ns: NetNS, reader: iptc_reader.IptcReader, case: str) -> None:
    backend, stats = make_backend(reader)
    target = target_of(ns)
    settle(backend, target, AMBIENT, stats)
    recorded = reader.fingerprint(ns.path, (4, 6), "HEADRACE_AM_")
    TAMPERING[case](ns)
    assert reader.fingerprint(ns.path, (4, 6), "HEADRACE_AM_") != recorded
    before = stats.snapshot()
    problems = backend.check(target, AMBIENT)
    after = stats.snapshot()
    assert problems, case  # the iptables-save compare reports it
    assert after["in_process"] == before["in_process"]
    assert after["iptables_save"] == before["iptables_save"] + 1
    # the agent's repair, then back to in-process checks
    settle(backend, target, AMBIENT, stats)
    assert reader.fingerprint(ns.path, (4, 6), "HEADRACE_AM_") == recorded


def test_sidecar_rules_and_a_v4_only_pod(ns: NetNS, reader: iptc_reader.IptcReader) -> None:
    backend, stats = make_backend(reader)
    target = target_of(ns, ("10.5.0.3",))
    settle(backend, target, SIDECAR, stats)
    ns.run(["iptables-legacy", "-t", "nat", "-D", "HEADRACE_SC_OUTPUT", "1"])
    assert backend.check(target, SIDECAR)
    # an IPv6 change does not concern a v4-only pod (neither check looks at IPv6)
    settle(backend, target, SIDECAR, stats)
    ns.run(["ip6tables-legacy", "-t", "nat", "-N", "HEADRACE_SC_V6"])
    n = stats.snapshot()["in_process"]
    assert backend.check(target, SIDECAR) == []
    assert stats.snapshot()["in_process"] == n + 1
    # a different spec is never answered from the record of another
    assert backend.check(target, SidecarSpec(exclude_outbound_ports=(25,)))
    assert stats.snapshot()["in_process"] == n + 1


def test_tproxy_sidecar_always_gets_the_full_check(ns: NetNS, reader: iptc_reader.IptcReader) -> None:
    """TPROXY mode's check also covers the policy routing, which the fingerprint does not see."""
    if not hasattr(builder, "uses_tproxy"):
        pytest.skip("no TPROXY mode in this tree")
    spec = SidecarSpec(interception_mode="TPROXY")  # type: ignore[arg-type, unused-ignore]
    backend, stats = make_backend(reader)
    target = target_of(ns)
    backend.apply(target, spec)
    assert backend.check(target, spec) == [] and backend.check(target, spec) == []
    assert stats.snapshot()["in_process"] == 0
    ns.run(["ip", "-4", "rule", "del", "pref", "32765"])
    assert any("policy routing" in p or "rule" in p for p in backend.check(target, spec))
    assert stats.snapshot()["in_process"] == 0


def test_foreign_rules_elsewhere_and_moved_jumps(ns: NetNS, reader: iptc_reader.IptcReader) -> None:
    backend, stats = make_backend(reader)
    target = target_of(ns)
    settle(backend, target, AMBIENT, stats)
    # Foreign rules that do not touch ours: still decided in-process.
    ns.run(["iptables-legacy", "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"])
    ns.run(["iptables-legacy", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "RETURN"])
    n = stats.snapshot()
    assert backend.check(target, AMBIENT) == []
    assert stats.snapshot()["in_process"] == n["in_process"] + 1
    # A foreign rule above our jump lets traffic skip it: drift, found by the full compare; the repair puts
    # our jump first again (the foreign rule stays, after ours) and the new state is learnt.
    ns.run(["iptables-legacy", "-t", "nat", "-I", "OUTPUT", "1", "-p", "udp", "-j", "RETURN"])
    problems = backend.check(target, AMBIENT)
    assert problems and all("rule ahead of our jump" in p for p in problems)
    assert stats.snapshot()["iptables_save"] == n["iptables_save"] + 1
    backend.apply(target, AMBIENT)
    assert backend.check(target, AMBIENT) == []
    assert backend.check(target, AMBIENT) == []
    assert stats.snapshot()["in_process"] == n["in_process"] + 2
    assert "-A OUTPUT -p udp -j RETURN" in ns.run(["iptables-legacy-save", "-t", "nat"]).stdout


def test_remove_forgets_and_missing_netns_falls_back(ns: NetNS, reader: iptc_reader.IptcReader) -> None:
    backend, stats = make_backend(reader)
    target = target_of(ns)
    settle(backend, target, AMBIENT, stats)
    backend.remove(target)
    assert backend.shortcut is not None and not backend.shortcut.recorded(ns.path)
    assert backend.check(target, AMBIENT)  # nothing there: the compare says what is missing
    gone = PodTarget(uid="u9", namespace="d", name="gone", netns_path=f"/run/netns/{ns.name}-gone")
    errors = stats.snapshot()["read_errors"]
    assert any("does not exist" in p for p in backend.check(gone, AMBIENT))
    assert stats.snapshot()["read_errors"] == errors + 1


def test_a_path_that_is_no_netns_is_a_read_error_and_the_reader_goes_on(
    ns: NetNS, reader: iptc_reader.IptcReader, tmp_path
) -> None:
    plain = tmp_path / "not-a-netns"
    plain.write_text("")
    with pytest.raises(iptc_reader.IptcReadError, match="Invalid argument"):
        reader.read(str(plain), (4,))
    with pytest.raises(iptc_reader.IptcReadError, match="No such file"):
        reader.read(str(tmp_path / "missing"), (4,))
    assert reader.ready()
    assert reader.read(ns.path, (4,)) == {4: {}}
    with pytest.raises(ValueError, match="families"):
        reader.read(ns.path, (5,))


def test_reading_creates_no_table_and_leaves_threads_home(ns: NetNS, reader: iptc_reader.IptcReader) -> None:
    own = os.stat("/proc/thread-self/ns/net").st_ino
    with entered(ns.path):
        names = open("/proc/thread-self/net/ip_tables_names").read() + open(
            "/proc/thread-self/net/ip6_tables_names").read()
    assert names.strip() == ""  # a fresh netns has no legacy table
    assert reader.read(ns.path, (4, 6)) == {4: {}, 6: {}}
    with entered(ns.path):
        names = open("/proc/thread-self/net/ip_tables_names").read() + open(
            "/proc/thread-self/net/ip6_tables_names").read()
    assert names.strip() == ""  # and reading it created none
    # readers from many threads at once: each answers for its netns, none stays behind
    backend, stats = make_backend(reader)
    target = target_of(ns)
    settle(backend, target, AMBIENT, stats)
    results: list[list[str]] = []

    def check() -> None:
        results.append(backend.check(target, AMBIENT))

    threads = [threading.Thread(target=check) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [[]] * 8
    assert os.stat("/proc/thread-self/ns/net").st_ino == own
    workers = [t for t in threading.enumerate() if t.name == "headrace-iptc-read"]
    assert len(workers) == 1  # one long-lived reader thread, not one per check
    # every thread of this process (the reader included) is back home, none left in the pod netns
    for tid in os.listdir("/proc/self/task"):
        try:
            assert os.stat(f"/proc/self/task/{tid}/ns/net").st_ino == own
        except FileNotFoundError:
            continue
    reader.close()
    workers[0].join(5)
    assert not workers[0].is_alive()
    assert backend.check(target, AMBIENT) == []  # a new worker starts on demand


def test_nft_backend_never_uses_python_iptables() -> None:
    from node_agent.backends.iptables.nft_generation import NftGenerationReader

    nft = IptablesBackend("nft").shortcut
    assert nft is not None and isinstance(nft.reader, NftGenerationReader)  # the ruleset generation
    assert IptablesBackend("legacy", in_process_check=False).shortcut is None
