"""The node-side probe SNAT's kind per node (nftables or iptables of the node's flavour) and whether its
changes are announced; an unknown kind is refused."""

from __future__ import annotations

import pytest
from node_agent.agent import node_rules


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
