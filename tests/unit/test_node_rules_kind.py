"""The node-side probe SNAT's kind per node (nftables or iptables of the node's flavour) and whether its
changes are announced; an unknown kind is refused; a rewrite is logged."""

from __future__ import annotations

import pytest
from node_agent.agent import node_rules

from cni.kernel import tables as kernel_tables


@pytest.mark.parametrize(
    ("nft", "flavour", "kind", "announced"),
    [(True, "legacy", "nftables", True), (False, "nft", "iptables-nft", True),
     (False, "legacy", "iptables-legacy", False)],
)
def test_kind_and_announced(nft: bool, flavour: str, kind: str, announced: bool) -> None:
    assert node_rules.kind(nft, flavour) == kind
    assert kind in node_rules.KINDS
    assert node_rules.announced(kind) is announced


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown node rules kind"):
        node_rules.make("iptables-xt")


def test_a_rewrite_is_logged_and_a_rule_set_found_right_is_left_alone(monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    found: list[list[str]] = [["IPv4 HEADRACE_POSTROUTING: rule missing"], []]
    written: list[list[str]] = []
    monkeypatch.setattr(kernel_tables, "check_node_probe_rules", lambda ns, ips, flavour: found.pop(0))
    monkeypatch.setattr(kernel_tables, "sync_node_probe_rules",
                        lambda ns, ips, flavour: written.append(list(ips)))
    sync = node_rules.make("iptables-legacy")
    with caplog.at_level("INFO", logger="headrace.agent.node_rules"):
        sync(["10.0.0.5"])
        sync(["10.0.0.5"])
    assert written == [["10.0.0.5"]]
    assert [r.getMessage() for r in caplog.records] == [
        "node probe SNAT written (iptables-legacy; 1 pod IPs): IPv4 HEADRACE_POSTROUTING: rule missing"]
