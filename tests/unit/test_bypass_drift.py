"""What makes traffic skip our redirect, as pure checks: a rule ahead of our jump, a policy other than
ACCEPT, foreign nftables base chains hooked ahead of our nat chains; and the repair's restore text."""

from __future__ import annotations

import json

from node_agent.backends import nft_foreign

from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.rules import builder, compare
from cni.rules.saved import parse_save
from cni.rules.transition import desired_from_ruleset, transition


def _as_save(rs: builder.RuleSet, head: str = "", policy: str = "ACCEPT") -> str:
    out = []
    for t in rs.tables:
        out.append(f"*{t.table}")
        out.extend([":PREROUTING ACCEPT [0:0]", f":OUTPUT {policy} [0:0]"])
        out.extend(f":{c} - [0:0]" for c in t.chains)
        if head:
            out.append(head)
        out.extend(t.jumps)
        out.extend(t.rules)
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def test_rule_ahead_of_our_jump_is_drift_and_the_repair_puts_ours_first() -> None:
    rs = builder.sidecar_rules(SidecarSpec(), 4)
    foreign = "-A OUTPUT -p tcp -j ACCEPT"
    saved = parse_save(_as_save(rs, head=foreign))
    problems = compare.compare(saved, rs)
    assert problems == [f"IPv4 nat: rule ahead of our jump in OUTPUT: '{foreign}'"]
    text = transition(saved, desired_from_ruleset(rs), rs.owner_prefix, skip_unchanged=True)
    assert "-I OUTPUT 1 " in text and foreign not in text  # ours first again, theirs left in place
    assert compare.compare(parse_save(_as_save(rs)), rs) == []


def test_policy_other_than_accept_is_drift_and_reset() -> None:
    rs = builder.ambient_rules(AmbientSpec(), 4)
    saved = parse_save(_as_save(rs, policy="DROP"))
    problems = compare.compare(saved, rs)
    assert "IPv4 mangle: chain OUTPUT policy is DROP, expected ACCEPT" in problems
    text = transition(saved, desired_from_ruleset(rs), rs.owner_prefix, skip_unchanged=True)
    assert ":OUTPUT ACCEPT [0:0]" in text
    assert transition(parse_save(_as_save(rs)), desired_from_ruleset(rs), rs.owner_prefix, skip_unchanged=True) == ""


def _ruleset(*items: dict[str, object]) -> str:
    return json.dumps({"nftables": [{"metainfo": {"version": "1.0.6"}}, *items]})


def test_foreign_base_chains_ahead_of_nat_are_found() -> None:
    text = _ruleset(
        {"chain": {"family": "ip", "table": "nat", "name": "OUTPUT", "handle": 1, "type": "nat", "hook": "output",
                   "prio": -100, "policy": "accept"}},
        {"chain": {"family": "inet", "table": "bar", "name": "raw", "handle": 2, "type": "filter",
                   "hook": "output", "prio": -300, "policy": "accept"}},
        {"chain": {"family": "inet", "table": "bar", "name": "late", "handle": 3, "type": "filter",
                   "hook": "output", "prio": 0, "policy": "accept"}},
        {"chain": {"family": "ip6", "table": "x", "name": "pre", "handle": 4, "type": "filter",
                   "hook": "prerouting", "prio": -150, "policy": "drop"}},
        {"chain": {"family": "inet", "table": "bar", "name": "empty", "handle": 5, "type": "filter",
                   "hook": "prerouting", "prio": -200, "policy": "accept"}},
        {"chain": {"family": "inet", "table": "bar", "name": "helper", "handle": 6}},
        {"chain": {"family": "inet", "table": "headrace", "name": "output", "handle": 10, "type": "nat",
                   "hook": "output", "prio": -100, "policy": "accept"}},
        {"rule": {"family": "inet", "table": "headrace", "chain": "output", "handle": 11, "expr": []}},
        {"rule": {"family": "inet", "table": "bar", "chain": "raw", "handle": 7, "expr": []}},
        {"rule": {"family": "inet", "table": "bar", "chain": "late", "handle": 8, "expr": []}},
        {"rule": {"family": "ip", "table": "nat", "chain": "OUTPUT", "handle": 9, "expr": []}},
    )
    chains = nft_foreign.parse_ruleset(text)
    v4 = nft_foreign.ahead_of_redirect(chains, (4,))
    assert [(c.table, c.name) for c in v4] == [("bar", "raw")]
    both = nft_foreign.ahead_of_redirect(chains, (4, 6))
    assert [(c.table, c.name) for c in both] == [("bar", "raw"), ("x", "pre")]
    assert nft_foreign.removal_script(both) == (
        "flush chain inet bar raw\ndelete chain inet bar handle 2\n"
        "flush chain ip6 x pre\ndelete chain ip6 x handle 4\n")
    assert "priority -300" in nft_foreign.problems_of(v4)[0]
    # the nftables backend owns only inet headrace: iptables-nft's non-empty nat OUTPUT is foreign there
    nft = nft_foreign.ahead_of_redirect(chains, (4,), nft_foreign.nftables_owned)
    assert [(c.family, c.table, c.name) for c in nft] == [("ip", "nat", "OUTPUT"), ("inet", "bar", "raw")]


def test_iptables_nft_chains_holding_only_our_jumps_are_told_apart() -> None:
    """A pod moving from the iptables backend to nftables: iptables-nft's base chains with nothing but jumps
    into our chains are the iptables backend's (logged as such when nftables takes them out), any other
    rule makes the chain foreign."""
    jump = {"jump": {"target": "HEADRACE_AM_OUTPUT"}}
    text = _ruleset(
        {"chain": {"family": "ip", "table": "nat", "name": "OUTPUT", "handle": 1, "type": "nat",
                   "hook": "output", "prio": -100, "policy": "accept"}},
        {"chain": {"family": "ip", "table": "mangle", "name": "OUTPUT", "handle": 2, "type": "route",
                   "hook": "output", "prio": -150, "policy": "accept"}},
        {"rule": {"family": "ip", "table": "nat", "chain": "OUTPUT", "handle": 3, "expr": [{"counter": None}, jump]}},
        {"rule": {"family": "ip", "table": "mangle", "chain": "OUTPUT", "handle": 4, "expr": [jump]}},
        {"rule": {"family": "ip", "table": "mangle", "chain": "OUTPUT", "handle": 5,
                  "expr": [{"jump": {"target": "OTHER"}}]}},
    )
    nat, mangle = nft_foreign.parse_ruleset(text)
    assert nat.only_our_jumps() and (nat.rules, nat.jumps_to_ours) == (1, 1)
    assert not mangle.only_our_jumps() and (mangle.rules, mangle.jumps_to_ours) == (2, 1)


def test_a_changed_policy_on_our_nftables_chain_is_drift() -> None:
    from cni.contract.spec import SidecarSpec
    from cni.rules import nft_builder
    from cni.rules.nft_compare import changed_policies, compare

    table = nft_builder.sidecar_table(SidecarSpec(), (4,))
    text = table.render()
    assert compare(text, table) == []
    dropped = text.replace("hook output priority -100; policy accept;", "hook output priority -100; policy drop;")
    assert changed_policies(dropped) == {"nat_output": "drop"}
    assert compare(dropped, table) == ["table inet headrace: chain nat_output has policy drop, want accept"]


def test_odd_names_are_reported_not_removed() -> None:
    odd = nft_foreign.BaseChain("inet", 'a"; flush ruleset', "c", 1, "output", -300, "accept", 1)
    try:
        nft_foreign.removal_script([odd])
    except ValueError as exc:
        assert "unexpected nftables name" in str(exc)
    else:
        raise AssertionError("expected ValueError")
    try:
        nft_foreign.parse_ruleset("not json")
    except nft_foreign.NftForeignError:
        pass
    else:
        raise AssertionError("expected NftForeignError")
