"""Whether iptables-nft's tables hold nothing but ours, read from `nft -j list ruleset` (pure): the listing
of a pod netns the ambient rules were written into, and each way someone else's things show in it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from node_agent.backends.iptables.nft_owned import not_ours_alone

TABLES = [(4, "mangle"), (4, "nat")]


def chain(table: str, name: str, hook: str | None = None, policy: str = "accept") -> dict[str, Any]:
    body: dict[str, Any] = {"family": "ip", "table": table, "name": name, "handle": 1}
    if hook is not None:
        body |= {"type": "nat" if table == "nat" else "filter", "hook": hook, "prio": -100, "policy": policy}
    return {"chain": body}


def rule(table: str, chain_name: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"rule": {"family": "ip", "table": table, "chain": chain_name, "handle": 2, "expr": list(expr)}}


JUMP = ({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
        {"counter": {"packets": 0, "bytes": 0}}, {"jump": {"target": "HEADRACE_AM_OUTPUT"}})
REDIRECT = ({"counter": {"packets": 0, "bytes": 0}}, {"xt": {"type": "target", "name": "REDIRECT"}})


def listing(*extra: dict[str, Any], drop: str = "") -> str:
    items: list[dict[str, Any]] = [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "ip", "name": "mangle", "handle": 1}},
        chain("mangle", "PREROUTING", "prerouting"), chain("mangle", "HEADRACE_AM_PRERT"),
        rule("mangle", "PREROUTING", *JUMP), rule("mangle", "HEADRACE_AM_PRERT", *REDIRECT),
        {"table": {"family": "ip", "name": "nat", "handle": 2}},
        chain("nat", "OUTPUT", "output"), chain("nat", "HEADRACE_AM_OUTPUT"),
        rule("nat", "OUTPUT", *JUMP), rule("nat", "HEADRACE_AM_OUTPUT", *REDIRECT),
        {"table": {"family": "inet", "name": "other", "handle": 3}},  # not one of ours: not looked at
        {"chain": {"family": "inet", "table": "other", "name": "x", "handle": 1}},
        *extra,
    ]
    if drop:
        items = [i for i in items if not ("table" in i and i["table"]["name"] == drop)]
    return json.dumps({"nftables": items})


def test_our_chains_and_iptables_base_chains_holding_our_jumps_are_ours_alone() -> None:
    assert not_ours_alone(listing(), TABLES) is None
    assert not_ours_alone(listing(chain("nat", "POSTROUTING", "postrouting")), TABLES) is None  # empty


@pytest.mark.parametrize(("extra", "why"), [
    (rule("nat", "OUTPUT", {"accept": None}), "ip nat OUTPUT holds a rule that is not a jump of ours"),
    (chain("nat", "KUBE-SOMETHING"), "ip nat holds chain KUBE-SOMETHING"),
    (chain("nat", "mychain", "output"), "ip nat holds base chain mychain"),
    (chain("nat", "PREROUTING", "prerouting", "drop"), "ip nat holds base chain PREROUTING (policy drop)"),
    ({"set": {"family": "ip", "table": "nat", "name": "s", "type": "ipv4_addr"}}, "ip nat holds a set"),
    ({"counter": {"family": "ip", "table": "mangle", "name": "c"}}, "ip mangle holds a counter"),
    ({"chain": {"family": "ip6", "table": "nat", "name": "HEADRACE_OUTPUT", "handle": 1}},
     "ip6 nat holds chain HEADRACE_OUTPUT of ours too"),
])
def test_anything_else_in_those_tables_says_what(extra: dict[str, Any], why: str) -> None:
    assert (not_ours_alone(listing(extra), TABLES) or "").startswith(why)


def test_a_table_of_the_spec_that_is_not_there_or_an_unreadable_listing() -> None:
    assert not_ours_alone(listing(drop="mangle"), TABLES) == "table ip mangle is not there"
    assert (not_ours_alone("not json", TABLES) or "").startswith("the ruleset listing is unreadable")
