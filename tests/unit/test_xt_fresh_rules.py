"""Reading an ADD's fresh restore text into x_tables records and laying the table out (pure parts of the
agent's in-process legacy write; the kernel test compares the blob with iptables-legacy-restore's)."""

from __future__ import annotations

import struct

import pytest
from node_agent.backends.iptables.xt_blob import HEADER, layout, pristine

from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.rules import builder
from cni.rules.transition import fresh_ruleset_text
from cni.rules.xt_fresh_rules import Unsupported, read_fresh


def fresh(spec: SidecarSpec, family: int) -> str:
    return fresh_ruleset_text(builder.sidecar_rules(spec, family))  # type: ignore[arg-type]


@pytest.mark.parametrize("family", [4, 6])
def test_a_sidecar_text_reads_back_in_kernel_order(family: int) -> None:
    (table,) = read_fresh(fresh(SidecarSpec(), family), family)
    assert table.name == "nat"
    assert table.chains == ("HEADRACE_SC_INBOUND", "HEADRACE_SC_IN_REDIRECT", "HEADRACE_SC_OUTPUT",
                            "HEADRACE_SC_REDIRECT")
    first = next(r for r in table.rules if r.chain == "PREROUTING")
    assert (first.target, first.proto) == ("HEADRACE_SC_INBOUND", 6)
    assert [m.name for m in first.matches] == ["comment"]
    redirect = next(r for r in table.rules if r.chain == "HEADRACE_SC_REDIRECT")
    assert not isinstance(redirect.target, str) and redirect.target.name == "REDIRECT"
    assert struct.pack("!H", 15001) in redirect.target.data
    owner = next(r for r in table.rules if any(m.name == "owner" for m in r.matches))
    assert owner.not_dst and owner.out_if == "lo"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("*nat\n-N A\n-A A -j RETURN\n", "no committed table"),
        ("*nat\nCOMMIT\n*nat\nCOMMIT\n", "table nat twice"),
        ("*nat\n*mangle\nCOMMIT\n", "a table inside a table"),
        ("*nat\n:A - [0:0]\nCOMMIT\n", "line"),
        ("*nat\n-D OUTPUT -j A\nCOMMIT\n", "line"),
        ("*nat\n-N A\n-N A\nCOMMIT\n", "declared twice"),
        ("*nat\n-A B -j RETURN\nCOMMIT\n", "does not create"),
        ("*nat\n-A OUTPUT -j B\nCOMMIT\n", "does not create"),
        ("*nat\n-I OUTPUT 2 -j RETURN\nCOMMIT\n", "past the chain's end"),
        ("*nat\n-A OUTPUT -j MARK --set-mark 1\nCOMMIT\n", "target"),
        ("*nat\n-A OUTPUT -m mark --mark 0x1/zz -j RETURN\nCOMMIT\n", "value"),
        ("*nat\n-A OUTPUT -m socket -j RETURN\nCOMMIT\n", "match -m socket"),
        ("*mangle\n-A OUTPUT -j CONNMARK --save-mark\nCOMMIT\n", "target CONNMARK"),
        ("*nat\n-A OUTPUT -p tcp -m tcp --dport 1:2 -j RETURN\nCOMMIT\n", "port"),
        ("*nat\n-A OUTPUT -m tcp --dport 80 -j RETURN\nCOMMIT\n", "match -m tcp"),
        ("*nat\n-A OUTPUT -p sctp -j RETURN\nCOMMIT\n", "option -p"),
        ("*nat\n-A OUTPUT -o eth+ -j RETURN\nCOMMIT\n", "interface"),
        ("*nat\n-A OUTPUT ! -s 10.0.0.0/8 -j RETURN\nCOMMIT\n", "option ! -s"),
        ("*nat\n-A OUTPUT -d 10.0.0.1 -j RETURN\nCOMMIT\n", "address"),
        ("*nat\n-A OUTPUT -d fd00::/8 -j RETURN\nCOMMIT\n", "address"),
        ("*nat\n-A OUTPUT ! ! -d 10.0.0.0/8 -j RETURN\nCOMMIT\n", "double negation"),
        ("*nat\n-A OUTPUT -m owner --uid-owner 1-5 -j RETURN\nCOMMIT\n", "owner id"),
        ("*nat\n-A OUTPUT -m comment --comment " + "x" * 300 + " -j RETURN\nCOMMIT\n", "comment too long"),
        ("*nat\n-A OUTPUT -p tcp\nCOMMIT\n", "without a target"),
        ("*nat\n-A OUTPUT -j REDIRECT\nCOMMIT\n", "REDIRECT"),
        ("*nat\n-A OUTPUT -j RETURN -j ACCEPT\nCOMMIT\n", "target 'RETURN -j ACCEPT'"),
    ],
)
def test_anything_outside_the_grammar_is_declined(text: str, why: str) -> None:
    with pytest.raises(Unsupported, match=why):
        read_fresh(text, 4)


def test_the_ambient_rules_read_back_table_by_table() -> None:
    text = fresh_ruleset_text(builder.ambient_rules(AmbientSpec(capture_dns=True), 4))
    mangle, nat = read_fresh(text, 4)
    assert (mangle.name, nat.name) == ("mangle", "nat")
    assert sorted(m.name for r in mangle.rules for m in r.matches) == ["comment"] * 4 + ["connmark", "mark"]
    assert {r.target.name for r in mangle.rules if not isinstance(r.target, str)} == {"CONNMARK"}
    assert any(m.name == "udp" for r in nat.rules for m in r.matches)


def test_tproxy_mode_is_declined() -> None:
    with pytest.raises(Unsupported):
        read_fresh(fresh(SidecarSpec(interception_mode="TPROXY"), 4), 4)


NAT_HOOKS = 0b11011  # PREROUTING, INPUT, OUTPUT, POSTROUTING


@pytest.mark.parametrize("family", [4, 6])
def test_a_new_table_is_its_policies_and_the_final_error_entry(family: int) -> None:
    blob = pristine(family, NAT_HOOKS)
    policy = HEADER[family] + 40  # header + standard target
    assert blob.num_entries == 5 and blob.policies == (0, 1, 2, 3)
    assert blob.hook_entry == blob.underflow == (0, policy, 0, 2 * policy, 3 * policy)
    assert len(blob.entries) == 4 * policy + HEADER[family] + 64  # + the ERROR target


def test_jumps_point_at_the_first_rule_after_the_chain_head() -> None:
    (table,) = read_fresh("*nat\n-N B\n-N A\n-I OUTPUT 1 -j B\n-A A -j RETURN\n-A B -j A\nCOMMIT\n", 4)
    blob = layout(table, NAT_HOOKS)
    entries = blob.entries
    std, head = HEADER[4] + 40, HEADER[4] + 64

    def verdict(at: int) -> int:
        value: int = struct.unpack_from("=i", entries, at + HEADER[4] + 32)[0]
        return value

    # PREROUTING, INPUT: policies; OUTPUT: the jump to B, its policy; POSTROUTING; then A, B (sorted)
    a_head = 5 * std
    a_first = a_head + head
    b_head = a_first + 2 * std  # A's rule and its RETURN
    assert verdict(2 * std) == b_head + head  # OUTPUT's jump lands on B's first rule
    assert verdict(b_head + head) == a_first  # B's rule jumps to A's first rule
    assert verdict(a_first) == -5 and blob.num_entries == 12  # 4 policies, 1 + 3 + 3, ERROR
