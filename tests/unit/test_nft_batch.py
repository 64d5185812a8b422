"""The nf_tables batch the agent and the plugin send to create a pod table in-process (pure; the kernel test
compares the table the kernel then holds with the one libnftables writes from the same text)."""

from __future__ import annotations

import random
import re
import struct

import pytest
from node_agent.backends.nftables import fresh_write

from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.netlink import netlink_parse
from cni.netlink import nft_messages as nm
from cni.rules import nft_builder
from cni.rules.nft_batch import Unsupported, batch, rule_body, tokens
from cni.rules.nft_text import Chain, NftTable
from tests.unit.netlink_batch import messages

CHAINS = frozenset({"sc_redirect"})


def names(exprs: bytes) -> list[str]:
    return [dict(netlink_parse.attributes(elem))[1].rstrip(b"\0").decode()
            for _, elem in netlink_parse.attributes(exprs)]


def test_one_transaction_that_fails_where_the_table_exists_and_one_acknowledgement() -> None:
    table = nft_builder.sidecar_table(SidecarSpec(), (4, 6))
    data, acked = batch(table, 3)
    msgs = messages(data)
    assert msgs[0][0] == nm.NFNL_MSG_BATCH_BEGIN and msgs[-1][0] == nm.NFNL_MSG_BATCH_END
    changes = msgs[1:-1]
    kinds = [m[0] & 0xFF for m in changes]
    assert kinds[0] == nm.NFT_MSG_NEWTABLE and changes[0][1] & nm.NLM_F_EXCL
    assert kinds.count(nm.NFT_MSG_NEWCHAIN) == len(table.chains)
    assert kinds.count(nm.NFT_MSG_NEWRULE) == sum(len(c.rules) for c in table.chains)
    assert [m[2] for m in changes if m[1] & nm.NLM_F_ACK] == [acked] == [changes[-1][2]]
    assert fresh_write.batch(table, 3) is fresh_write.batch(table, 3) == (data, acked)  # the agent: once a table


def test_dependencies_come_once_and_only_where_the_rule_lacks_them() -> None:
    exprs, _ = rule_body('oifname "lo" ip daddr != 127.0.0.1 tcp dport != 15008 meta skuid 1337 return '
                         'comment "headrace: x"', CHAINS)
    assert names(exprs) == ["meta", "cmp", "meta", "cmp", "payload", "cmp", "meta", "cmp", "payload", "cmp",
                            "meta", "cmp", "immediate"]
    exprs, _ = rule_body("meta l4proto tcp tcp dport 80 return", CHAINS)
    assert names(exprs) == ["meta", "cmp", "payload", "cmp", "immediate"]
    exprs, _ = rule_body("meta l4proto tcp redirect to :15001", CHAINS)
    assert names(exprs) == ["meta", "cmp", "immediate", "redir"]


@pytest.mark.parametrize(("prefix", "exprs"), [
    ("10.0.0.0/8", ["payload", "cmp"]),
    ("10.96.0.0/12", ["payload", "bitwise", "cmp"]),
    ("1.2.3.4", ["payload", "cmp"]),
])
def test_an_address_loads_what_nft_loads(prefix: str, exprs: list[str]) -> None:
    body, _ = rule_body(f"ip daddr {prefix} return", CHAINS)
    assert names(body) == ["meta", "cmp", *exprs, "immediate"]


def test_the_comment_is_the_rules_user_data() -> None:
    _, userdata = rule_body('return comment "headrace: skip"', CHAINS)
    assert userdata == b"\x00\x0fheadrace: skip\x00"
    _, userdata = rule_body("return", CHAINS)
    assert userdata is None


def test_marks_are_loaded_masked_and_set_as_nft_does() -> None:
    exprs, _ = rule_body("meta mark & 0x00000fff != 0x00000539 redirect to :15001", CHAINS)
    assert names(exprs) == ["meta", "bitwise", "cmp", "immediate", "redir"]
    exprs, _ = rule_body("ct mark & 0x00000fff == 0x00000111 meta mark set ct mark", CHAINS)
    assert names(exprs) == ["ct", "bitwise", "cmp", "ct", "meta"]
    exprs, _ = rule_body("meta mark & 0x00000fff == 0x00000539 ct mark set ct mark & 0xfffff111 | 0x00000111",
                         CHAINS)
    assert names(exprs) == ["meta", "bitwise", "cmp", "ct", "bitwise", "ct"]
    # (mark & 0xfffff111) | 0x111 is sent as mark & 0xfffff000 ^ 0x111, host byte order
    assert nm.bitwise(struct.pack("=I", 0xFFFFF000), struct.pack("=I", 0x111)) in exprs


@pytest.mark.parametrize("rule", [
    "meta mark set 0x00000539 accept",
    "meta mark & 0xfff 0x539 accept",
    "meta mark & 0x1fffffffff == 0x1 accept",
    "meta mark & fff == 0x1 accept",
    "ct mark set ct mark & 0xfff accept",
    "ct state established accept",
    "meta mark set meta mark",
    'iifname "eth*" return',
    'oifname "a-name-too-long-for-linux" return',
    "jump elsewhere",
    "ip daddr fd00::1 return",
    "ip6 daddr ::1 tcp dport 1 udp dport 2 return",
    "ip daddr 0.0.0.0/0 return",
    "tcp dport 70000 return",
    "tcp dport 80 meta l4proto tcp return",
    "tproxy ip to :15006",
    "redirect",
    'return comment "' + "x" * 200 + '"',
    "return accept",
    "",
])
def test_what_it_does_not_lay_out_is_left_to_libnftables(rule: str) -> None:
    with pytest.raises(Unsupported):
        rule_body(rule, CHAINS)


def test_ambient_tables_are_laid_out_and_tproxy_ones_left_to_libnftables() -> None:
    for families in ((4, 6), (6,)):
        batch(nft_builder.ambient_table(AmbientSpec(capture_dns=True), families))
    with pytest.raises(Unsupported):
        batch(nft_builder.sidecar_table(SidecarSpec(interception_mode="TPROXY"), (4,)))
    with pytest.raises(Unsupported):
        batch(NftTable("headrace", (Chain("c", "type nat hook output priority first", ()),)))


@pytest.mark.parametrize("text", [
    'oifname "lo" ip daddr != 127.0.0.1 return comment "headrace: a b"', '  a  "b c"d "e', 'x"y z" "', '"', '',
    '\t"a"\n b ', 'comment "" x', '"a" "b"',
])
def test_tokens_are_the_regular_expressions_words(text: str) -> None:
    assert tokens(text) == re.findall(r'"[^"]*"|\S+', text)


def test_tokens_fuzz() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        text = "".join(rng.choice('ab "\t\n\u00a0!=') for _ in range(rng.randrange(12)))
        assert tokens(text) == re.findall(r'"[^"]*"|\S+', text), repr(text)


def test_a_port_of_other_digits_is_not_laid_out() -> None:
    with pytest.raises(Unsupported):
        rule_body("tcp dport \u0663 return", CHAINS)  # an Arabic-Indic three: isdigit, but not a port
