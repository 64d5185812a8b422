"""select_backend with nftables: forced, and `auto` on a host without an iptables binary (stubbed)."""

from __future__ import annotations

import pytest
from node_agent.backends import select


class FakeBackend:
    def __init__(self, name: str) -> None:
        self.name = name


@pytest.fixture(autouse=True)
def fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(select, "_iptables", lambda flavour, change_count_dir=None: FakeBackend("iptables"))
    monkeypatch.setattr(select, "_nftables", lambda: FakeBackend("nftables"))


def test_nftables_forced() -> None:
    choice = select.select_backend("nftables", problems_fn=lambda: [])
    assert choice.backend.name == "nftables" and "nftables" in choice.reason


def test_auto_without_ebpf_and_without_iptables_picks_nftables() -> None:
    choice = select.select_backend("auto", problems_fn=lambda: ["no bcc"], iptables_present=False)
    assert choice.backend.name == "nftables"
    assert "no iptables binary" in choice.reason


def test_auto_without_ebpf_with_iptables_keeps_iptables() -> None:
    choice = select.select_backend("auto", problems_fn=lambda: ["no bcc"], iptables_present=True)
    assert choice.backend.name == "iptables"


def test_rules_backend_setting() -> None:
    assert select.rules_backend_setting(True) == "iptables"
    assert select.rules_backend_setting(False) == "nftables"
