"""select_backend: auto / iptables / ebpf, reasons and errors (the probe is stubbed)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from node_agent.backends import select
from node_agent.backends.base import BackendError, PodTarget
from node_agent.backends.ebpf import attach, maps
from node_agent.backends.ebpf.backend import EbpfBackend

from cni.contract.spec import AmbientSpec, SidecarSpec


class FakeIptables:
    name = "iptables"

    def __init__(self, flavour: str, change_count_dir: Path | None = None) -> None:
        self.flavour = flavour
        self.change_count_dir = change_count_dir  # the node's own backend counts x_tables changes


@pytest.fixture(autouse=True)
def fake_iptables(monkeypatch):
    monkeypatch.setattr(select, "_iptables", FakeIptables)


def test_iptables_forced():
    choice = select.select_backend("iptables", iptables_flavour="legacy", problems_fn=lambda: ["x"])
    backend, reason = choice
    assert isinstance(backend, FakeIptables) and backend.flavour == "legacy"
    assert backend.change_count_dir == select.DEFAULT_STATE_DIR
    assert "iptables" in reason


def test_auto_falls_back_with_reason(caplog):
    backend, reason = select.select_backend("auto", problems_fn=lambda: ["kernel headers missing: install X"])
    assert isinstance(backend, FakeIptables)
    assert "kernel headers missing" in reason and "iptables" in reason
    assert "kernel headers missing" in caplog.text


def test_ebpf_forced_fails_closed_naming_the_problem():
    with pytest.raises(BackendError, match="bcc is not importable"):
        select.select_backend("ebpf", problems_fn=lambda: ["bcc is not importable (no module)"])


def test_ebpf_chosen_when_probe_passes(tmp_path):
    choice = select.select_backend("auto", state_dir=tmp_path, iptables_flavour="nft", problems_fn=lambda: [])
    assert isinstance(choice.backend, EbpfBackend)
    assert choice.backend.inbound is None and choice.backend.inbound_in_ebpf
    # ambient pods' inbound goes to the rules backend (CONNMARK + policy routing for original-source delivery)
    assert isinstance(choice.backend.ambient_inbound, FakeIptables) and choice.backend.ambient_inbound.flavour == "nft"
    assert choice.backend.ambient_inbound.change_count_dir is None  # the eBPF node's rules part: no count
    assert "ambient pods' inbound via iptables" in choice.reason
    assert choice.backend.rules_inbound(AmbientSpec()) is choice.backend.ambient_inbound
    assert choice.backend.rules_inbound(SidecarSpec()) is None  # sidecar inbound stays in TC eBPF
    hybrid = select.select_backend("ebpf", state_dir=tmp_path, inbound="iptables", problems_fn=lambda: [])
    assert isinstance(hybrid.backend, EbpfBackend) and isinstance(hybrid.backend.inbound, FakeIptables)
    assert hybrid.backend.ambient_inbound is None
    assert hybrid.backend.rules_inbound(AmbientSpec()) is hybrid.backend.inbound


def test_ambient_inbound_is_nftables_without_an_iptables_binary(tmp_path, monkeypatch):
    class FakeNft:
        name = "nftables"

    monkeypatch.setattr(select, "_nftables", FakeNft)
    choice = select.select_backend("ebpf", state_dir=tmp_path, problems_fn=lambda: [], iptables_present=False)
    assert isinstance(choice.backend, EbpfBackend) and isinstance(choice.backend.ambient_inbound, FakeNft)
    assert "ambient pods' inbound via nftables" in choice.reason
    assert choice.backend.state_dir == tmp_path
    assert choice.backend.name == "ebpf"
    assert "eBPF" in choice.reason


def test_unknown_setting():
    with pytest.raises(BackendError, match="unknown backend"):
        select.select_backend("pf")


class RecordingInbound:
    name = "rec"

    def __init__(self) -> None:
        self.specs: list[object] = []

    def apply(self, target, spec):
        self.specs.append(spec)

    def remove(self, target):
        self.specs.clear()

    def check(self, target, spec):
        return []

    def installed(self, target):
        return bool(self.specs)


def test_inbound_fallback_gets_inbound_only_spec(monkeypatch, tmp_path):
    monkeypatch.setattr("node_agent.backends.ebpf.backend.validate_cgroup", lambda p: Path(str(p)))
    monkeypatch.setattr("node_agent.backends.ebpf.backend.staying_in", lambda netns: contextlib.nullcontext())
    monkeypatch.setattr("node_agent.backends.ebpf.pod_state.installed", lambda pdir, cg: False)
    monkeypatch.setattr(EbpfBackend, "_apply_ebpf", lambda self, t, s, c, e, o: None)
    (tmp_path / "bpf").mkdir()  # a plain directory: a unit test mounts nothing
    monkeypatch.setattr(EbpfBackend, "_root", lambda self: tmp_path / "bpf")
    rec = RecordingInbound()
    b = EbpfBackend(tmp_path, inbound_fallback=rec)
    assert not b.inbound_in_ebpf
    t = PodTarget(uid="u", namespace="n", name="p", netns_path="/x", cgroup_path="/cg")
    b.apply(t, SidecarSpec())
    assert rec.specs == [maps.inbound_only(SidecarSpec())]
    b.apply(t, SidecarSpec(include_inbound_ports=()))  # no inbound wanted any more: fallback removed
    assert rec.specs == []


def test_validate_cgroup_errors(tmp_path):
    with pytest.raises(attach.CgroupError, match="unknown"):
        attach.validate_cgroup(None)
    with pytest.raises(attach.CgroupError, match="does not exist"):
        attach.validate_cgroup(str(tmp_path / "missing"))
    with pytest.raises(attach.CgroupError):
        attach.validate_cgroup(str(tmp_path))  # not a cgroup2 dir


def test_ambient_inbound_takes_only_ambient_pods(monkeypatch, tmp_path):
    """Default eBPF node: an ambient pod's inbound goes to the rules backend, a sidecar pod's stays in TC;
    a pod pinned as sidecar never costs a rules read; remove takes the ambient rules out."""
    monkeypatch.setattr("node_agent.backends.ebpf.backend.validate_cgroup", lambda p: Path(str(p)))
    monkeypatch.setattr("node_agent.backends.ebpf.backend.staying_in", lambda netns: contextlib.nullcontext())
    monkeypatch.setattr("node_agent.backends.ebpf.pod_state.installed", lambda pdir, cg: False)
    monkeypatch.setattr(EbpfBackend, "_apply_ebpf", lambda self, t, s, c, e, o: None)
    monkeypatch.setattr(EbpfBackend, "_remove_ebpf", lambda self, t: None)
    mode: list[int | None] = [None]
    monkeypatch.setattr(EbpfBackend, "_pinned",
                        lambda self, t: (mode[0] is not None, None if mode[0] is None else {"mode": mode[0]}))
    rec = RecordingInbound()
    reads: list[str] = []
    real_installed = rec.installed

    def installed(t: PodTarget) -> bool:
        reads.append(t.uid)
        return bool(real_installed(t))

    monkeypatch.setattr(rec, "installed", installed)
    b = EbpfBackend(tmp_path, ambient_inbound=rec, proxy_cgroup="/pcg")
    assert b.inbound_in_ebpf
    t = PodTarget(uid="u", namespace="n", name="p", netns_path="/x", cgroup_path="/cg")
    b.apply(t, SidecarSpec())
    assert rec.specs == [] and reads == []
    mode[0] = maps.MODE_SIDECAR
    b.apply(t, SidecarSpec())
    b.remove(t)
    assert reads == []
    mode[0] = None
    b.apply(t, AmbientSpec())
    assert rec.specs == [maps.inbound_only(AmbientSpec())]
    mode[0] = maps.MODE_AMBIENT
    b.apply(t, SidecarSpec())  # an ambient pod turned sidecar: its ambient rules come out
    assert rec.specs == [] and reads == ["u"]
    b.apply(t, AmbientSpec())
    b.remove(t)
    assert rec.specs == []
