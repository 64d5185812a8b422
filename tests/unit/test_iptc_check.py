"""DriftShortcut decisions with a fake reader, the reader's loading states, metrics and wiring (no root)."""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence

import pytest
from node_agent.backends.base import PodTarget
from node_agent.backends.iptables import backend as iptables_backend
from node_agent.backends.iptables import iptc_reader, nft_fresh_write
from node_agent.backends.iptables.backend import IptablesBackend, in_process_check_enabled, iptables_only_check
from node_agent.backends.iptables.iptc_check import CheckStats, DriftShortcut
from node_agent.backends.iptables.iptc_reader import IptcReader, IptcReadError, IptcUnavailable
from node_agent.serve.metrics import AgentMetrics
from prometheus_client import generate_latest

from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.kernel import tables as netns_tables
from cni.rules import builder

NS = "/run/netns/pod-a"
PREFIX = "HEADRACE_AM_"


class FakeReader:
    """Returns the digests in `script` one per read (an exception instance is raised instead)."""

    def __init__(self, *script: bytes | Exception, ready: bool = True) -> None:
        self.script = list(script)
        self.is_ready = ready
        self.reads = 0
        self.loading_started = 0
        self.on_read: Callable[[], None] | None = None

    def ready(self) -> bool:
        return self.is_ready

    def start_loading(self) -> None:
        self.loading_started += 1

    def fingerprint(self, netns_path: str, families: Sequence[int], prefix: str) -> bytes:
        self.reads += 1
        if self.on_read is not None:
            self.on_read()
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, Exception):
            raise item
        return item


class Authority:
    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self) -> list[str]:
        self.calls += 1
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def shortcut(reader: FakeReader) -> tuple[DriftShortcut, CheckStats]:
    stats = CheckStats()
    return DriftShortcut(reader, stats), stats


def test_clean_full_check_records_then_checks_are_in_process() -> None:
    sc, stats = shortcut(FakeReader(b"A"))
    auth = Authority([])
    assert sc.check(NS, AmbientSpec(), (4, 6), PREFIX, auth) == [] and auth.calls == 1
    assert sc.recorded(NS)
    for _ in range(3):
        assert sc.check(NS, AmbientSpec(), (4, 6), PREFIX, auth) == []
    assert auth.calls == 1
    assert stats.snapshot() == {"in_process": 3, "iptables_save": 1, "read_errors": 0}


def test_a_different_fingerprint_asks_the_authority_and_returns_its_problems() -> None:
    reader = FakeReader(b"A", b"A", b"B")
    sc, stats = shortcut(reader)
    auth = Authority([], ["IPv4 nat: chain HEADRACE_AM_PRERT is missing"])
    sc.check(NS, AmbientSpec(), (4,), PREFIX, auth)
    assert sc.check(NS, AmbientSpec(), (4,), PREFIX, auth) == ["IPv4 nat: chain HEADRACE_AM_PRERT is missing"]
    assert not sc.recorded(NS)  # problems: the record is dropped (the caller repairs)
    assert stats.snapshot()["iptables_save"] == 2 and stats.snapshot()["in_process"] == 0


def test_changed_but_intact_is_relearnt() -> None:
    sc, stats = shortcut(FakeReader(b"A", b"A", b"B"))  # e.g. a foreign rule moved our jump
    auth = Authority([])
    sc.check(NS, AmbientSpec(), (4,), PREFIX, auth)
    assert sc.check(NS, AmbientSpec(), (4,), PREFIX, auth) == []
    assert sc.check(NS, AmbientSpec(), (4,), PREFIX, auth) == []
    assert auth.calls == 2 and stats.snapshot()["in_process"] == 1


def test_a_written_state_is_the_record_until_it_changes() -> None:
    """`record_written` stands in for the full check: the next check with that digest asks no authority;
    another digest, spec or family set does."""
    sc, stats = shortcut(FakeReader(b"G7", b"G7", b"G8"))
    auth = Authority([])
    sc.record_written(NS, AmbientSpec(), (4,), PREFIX, b"G7")
    assert sc.check(NS, AmbientSpec(), (4,), PREFIX, auth) == [] and auth.calls == 0
    assert sc.check(NS, AmbientSpec(), (4, 6), PREFIX, auth) == [] and auth.calls == 1  # other families
    sc.record_written(NS, AmbientSpec(), (4,), PREFIX, b"G7")
    assert sc.check(NS, AmbientSpec(), (4,), PREFIX, auth) == [] and auth.calls == 2  # G8 now: changed
    assert stats.snapshot()["in_process"] == 1


def test_a_record_follows_its_netns_to_its_pin() -> None:
    """Applied at the runtime's netns path, checked at the agent's pin of it: the record moves along."""
    sc, stats = shortcut(FakeReader(b"G7"))
    auth = Authority([])
    sc.record_written("/run/netns/cni-1", AmbientSpec(), (4,), PREFIX, b"G7")
    sc.moved("/run/netns/cni-1", NS)
    sc.moved("/run/netns/unknown", "/elsewhere")  # nothing recorded there: nothing happens
    assert not sc.recorded("/run/netns/cni-1")
    assert sc.check(NS, AmbientSpec(), (4,), PREFIX, auth) == [] and auth.calls == 0
    assert stats.snapshot()["in_process"] == 1


@pytest.mark.parametrize(
    ("moved", "counted", "expected", "same_netns", "only_ours"),
    [(2, 2, 2, True, True), (3, 2, 2, True, False), (1, 1, 2, True, False), (2, 2, 2, False, False),
     (0, 0, 0, True, False), (2, 3, 2, True, False)],
)
def test_only_fresh_commits(moved: int, counted: int, expected: int, same_netns: bool, only_ours: bool) -> None:
    """Exactly the expected commits, every one counted as a fresh batch of ours, in the same netns; the
    32-bit generation wraps."""
    before = nft_fresh_write.Mark((1, 100), 0xFFFFFFFF, 5)
    after = nft_fresh_write.Mark((1, 100 if same_netns else 101), (0xFFFFFFFF + moved) % (1 << 32), 5 + counted)
    assert nft_fresh_write.only_fresh_commits(before, after, expected) is only_ours


@pytest.mark.parametrize(
    ("other_spec", "other_families", "other_prefix"),
    [(AmbientSpec(capture_dns=True), (4,), PREFIX), (AmbientSpec(), (4, 6), PREFIX), (AmbientSpec(), (4,), "X_")],
)
def test_record_is_for_one_spec_family_set_and_prefix(other_spec, other_families, other_prefix) -> None:
    sc, _ = shortcut(FakeReader(b"A"))
    auth = Authority([])
    sc.check(NS, AmbientSpec(), (4,), PREFIX, auth)
    sc.check(NS, other_spec, other_families, other_prefix, auth)
    assert auth.calls == 2


class FakeQuick:
    """A whole-netns digest reader: returns `value` (raises it when an exception), counts reads."""

    def __init__(self, value: bytes | Exception = b"Q") -> None:
        self.value = value
        self.reads = 0

    def digest(self, netns_path: str, families: Sequence[int]) -> bytes:
        self.reads += 1
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


def test_an_unchanged_quick_digest_spares_the_fingerprint_read() -> None:
    reader, quick, stats = FakeReader(b"A"), FakeQuick(), CheckStats()
    sc = DriftShortcut(reader, stats, quick=quick)
    auth = Authority([])
    sc.check(NS, AmbientSpec(), (4,), PREFIX, auth)  # the full check: recorded, no quick digest yet
    sc.check(NS, AmbientSpec(), (4,), PREFIX, auth)  # the fingerprint matches: its quick digest is kept
    reads = reader.reads
    for _ in range(3):
        assert sc.check(NS, AmbientSpec(), (4,), PREFIX, auth) == []
    assert reader.reads == reads and auth.calls == 1  # neither python-iptables nor iptables-save
    quick.value = b"R"  # something in the netns changed (a foreign rule, or ours)
    assert sc.check(NS, AmbientSpec(), (4,), PREFIX, auth) == []
    assert reader.reads == reads + 1 and auth.calls == 1  # the fingerprint still matched: ours is intact
    reader.script = [b"B"]  # now our part changed: the authority decides
    quick.value = b"S"
    auth.answers = [["IPv4 nat: rule altered"]]
    assert sc.check(NS, AmbientSpec(), (4,), PREFIX, auth) == ["IPv4 nat: rule altered"]
    assert not sc.recorded(NS)


def test_the_quick_digest_is_for_one_record_and_its_failures_fall_through() -> None:
    reader, quick = FakeReader(b"A"), FakeQuick()
    sc = DriftShortcut(reader, CheckStats(), quick=quick)
    auth = Authority([])
    sc.check(NS, AmbientSpec(), (4,), PREFIX, auth)
    sc.check(NS, AmbientSpec(), (4,), PREFIX, auth)
    assert sc.check(NS, AmbientSpec(capture_dns=True), (4,), PREFIX, auth) == [] and auth.calls == 2  # new spec
    sc.forget(NS)  # an apply: the next check is the full one, whatever the quick digest says
    assert sc.check(NS, AmbientSpec(capture_dns=True), (4,), PREFIX, auth) == [] and auth.calls == 3
    quick.value = OSError(11, "table replaced meanwhile")
    reads = reader.reads
    assert sc.check(NS, AmbientSpec(capture_dns=True), (4,), PREFIX, auth) == []
    assert reader.reads == reads + 1 and sc.stats.snapshot()["read_errors"] == 1


def test_a_change_racing_with_the_full_check_is_not_recorded() -> None:
    sc, _ = shortcut(FakeReader(b"A", b"B", b"B"))  # before != after the compare
    auth = Authority([])
    sc.check(NS, AmbientSpec(), (4,), PREFIX, auth)
    assert not sc.recorded(NS)


def test_an_apply_during_the_full_check_is_not_recorded() -> None:
    reader = FakeReader(b"A")
    sc, _ = shortcut(reader)

    def auth() -> list[str]:
        sc.forget(NS)  # what IptablesBackend.apply does, from another thread
        return []

    sc.check(NS, AmbientSpec(), (4,), PREFIX, auth)
    assert not sc.recorded(NS)


def test_not_loaded_or_failing_reader_falls_back() -> None:
    reader = FakeReader(b"A", ready=False)
    sc, _ = shortcut(reader)
    auth = Authority([])
    assert sc.check(NS, AmbientSpec(), (4,), PREFIX, auth) == []
    assert reader.loading_started == 1 and reader.reads == 0 and not sc.recorded(NS)
    failing = FakeReader(IptcReadError("boom"))
    sc2, stats2 = shortcut(failing)
    for _ in range(2):
        assert sc2.check(NS, AmbientSpec(), (4,), PREFIX, auth) == []
    assert stats2.snapshot() == {"in_process": 0, "iptables_save": 2, "read_errors": 2}


def test_authority_errors_propagate() -> None:
    sc, _ = shortcut(FakeReader(b"A"))

    def auth() -> list[str]:
        raise RuntimeError("iptables-save failed")

    with pytest.raises(RuntimeError, match="iptables-save"):
        sc.check(NS, AmbientSpec(), (4,), PREFIX, auth)


def test_stats_refuse_unknown_paths() -> None:
    with pytest.raises(ValueError, match="unknown"):
        CheckStats().count("other")


def test_metrics_export_the_counts() -> None:
    m = AgentMetrics(iptables_checks=lambda: {"in_process": 7, "iptables_save": 2, "read_errors": 1})
    text = generate_latest(m.registry).decode()
    assert 'headrace_agent_iptables_checks_total{path="in_process"} 7.0' in text
    assert 'headrace_agent_iptables_checks_total{path="iptables_save"} 2.0' in text
    assert "headrace_agent_iptables_inprocess_read_errors_total 1.0" in text
    assert "headrace_agent_iptables_checks_total" in generate_latest(AgentMetrics().registry).decode()


# ---------------------------------------------------------------- the reader's states and the wiring


def test_reader_is_unavailable_until_loaded_and_when_loading_fails() -> None:
    def broken() -> types.ModuleType:
        raise OSError("libip4tc.so.2: cannot open shared object file")

    r = IptcReader(loader=broken)
    with pytest.raises(IptcUnavailable):
        r.read(NS, (4,))
    assert not r.wait_ready(10)
    assert r.error is not None and "libip4tc" in r.error
    with pytest.raises(IptcUnavailable, match="libip4tc"):
        r.fingerprint(NS, (4,), PREFIX)
    incomplete = IptcReader(loader=lambda: types.ModuleType("iptc"))
    assert not incomplete.wait_ready(10) and "Table" in str(incomplete.error)


def test_prepare_env_keeps_an_existing_setting(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("XTABLES_LIBDIR", "/opt/xt")
    assert iptc_reader.prepare_env((str(tmp_path),)) == "/opt/xt"
    monkeypatch.delenv("XTABLES_LIBDIR")
    assert iptc_reader.prepare_env((str(tmp_path / "missing"), str(tmp_path))) == str(tmp_path)
    monkeypatch.delenv("XTABLES_LIBDIR")  # prepare_env set it; monkeypatch restores the original at exit
    assert iptc_reader.prepare_env((str(tmp_path / "missing"),)) is None


@pytest.mark.parametrize(
    ("value", "on"), [(None, True), ("1", True), ("yes", True), ("0", False), ("off", False), (" False ", False)]
)
def test_env_switch(value: str | None, on: bool) -> None:
    env = {} if value is None else {iptables_backend.IPTC_ENV: value}
    assert in_process_check_enabled(env) is on


def test_backend_picks_the_shortcut_of_its_flavour(monkeypatch) -> None:
    from node_agent.backends.iptables.iptc_reader import IptcReader
    from node_agent.backends.iptables.nft_generation import NftGenerationReader

    monkeypatch.setenv("XTABLES_LIBDIR", "/usr/lib/x86_64-linux-gnu/xtables")
    monkeypatch.delenv(iptables_backend.IPTC_ENV, raising=False)
    legacy, nft = IptablesBackend("legacy").shortcut, IptablesBackend("nft").shortcut
    assert legacy is not None and isinstance(legacy.reader, IptcReader)
    assert nft is not None and isinstance(nft.reader, NftGenerationReader)
    assert IptablesBackend("legacy", in_process_check=False).shortcut is None
    monkeypatch.setenv(iptables_backend.IPTC_ENV, "0")
    assert IptablesBackend("legacy").shortcut is None and IptablesBackend("nft").shortcut is None


def test_backend_check_goes_through_the_shortcut_with_the_right_prefix(monkeypatch) -> None:
    backend = IptablesBackend("legacy", in_process_check=False)
    seen: list[tuple[str, tuple[int, ...]]] = []
    reader = FakeReader(b"A")
    backend.shortcut = DriftShortcut(reader, CheckStats())
    original = reader.fingerprint

    def spy(netns_path: str, families: Sequence[int], prefix: str) -> bytes:
        seen.append((prefix, tuple(families)))
        return original(netns_path, families, prefix)

    monkeypatch.setattr(reader, "fingerprint", spy)
    monkeypatch.setattr(netns_tables, "check_ambient", lambda *a: [])
    monkeypatch.setattr(netns_tables, "check_sidecar", lambda *a: ["missing"])
    monkeypatch.setattr(netns_tables, "apply_ambient", lambda *a, **k: None)
    target = PodTarget(uid="u", namespace="d", name="n", netns_path=NS, ips=("10.0.0.2",))
    assert backend.check(target, AmbientSpec()) == []
    assert backend.shortcut.recorded(NS)
    assert backend.check(target, SidecarSpec()) == ["missing"]
    assert seen[0] == ("HEADRACE_AM_", (4,)) and seen[-1] == ("HEADRACE_SC_", (4,))
    backend.check(target, AmbientSpec())
    backend.apply(target, AmbientSpec())
    assert not backend.shortcut.recorded(NS)  # apply forgets: the next check is the full compare


def test_only_iptables_only_checks_may_be_shortcut() -> None:
    assert iptables_only_check(AmbientSpec()) and iptables_only_check(SidecarSpec())
    if not hasattr(builder, "uses_tproxy"):
        pytest.skip("no TPROXY mode in this tree")
    tproxy = SidecarSpec(interception_mode="TPROXY")  # type: ignore[arg-type, unused-ignore]
    assert builder.uses_tproxy(tproxy) and not iptables_only_check(tproxy)  # policy routing is checked too
