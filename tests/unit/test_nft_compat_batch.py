"""The nf_tables batch the agent sends in place of iptables-nft-restore for an ADD's fresh text (pure; the
kernel test compares the resulting ruleset with iptables-nft-restore's)."""

from __future__ import annotations

import struct

import pytest

from cni.contract.spec import SidecarSpec
from cni.netlink import netlink_parse
from cni.netlink import nft_messages as nm
from cni.rules import builder
from cni.rules import nft_compat_batch as nb
from cni.rules.transition import fresh_ruleset_text
from cni.rules.xt_fresh_rules import Unsupported, read_fresh
from tests.unit.netlink_batch import messages


def expressions(body: bytes) -> list[str]:
    """The expression names of a NEWRULE body."""
    rule = dict(netlink_parse.attributes(body))
    names = []
    for _, elem in netlink_parse.attributes(rule[4]):
        name = dict(netlink_parse.attributes(elem))[1]
        names.append(name.rstrip(b"\0").decode())
    return names


def test_one_transaction_that_fails_where_the_table_exists_and_one_acknowledgement() -> None:
    (table,) = read_fresh(fresh_ruleset_text(builder.sidecar_rules(SidecarSpec(), 4)), 4)
    data, acked = nb.batch((table,), 7)
    msgs = messages(data)
    assert msgs[0][0] == nm.NFNL_MSG_BATCH_BEGIN and msgs[-1][0] == nm.NFNL_MSG_BATCH_END
    changes = msgs[1:-1]
    assert [seq for _, _, seq, _ in changes] == list(range(8, 8 + len(changes)))
    assert acked == changes[-1][2] and msgs[-1][2] == acked + 1
    assert [bool(flags & nm.NLM_F_ACK) for _, flags, _, _ in changes] == [False] * (len(changes) - 1) + [True]
    kind = nm.NFNL_SUBSYS_NFTABLES << 8
    assert changes[0][0] == kind | nm.NFT_MSG_NEWTABLE and changes[0][1] & nm.NLM_F_EXCL
    chains = [c for c in changes if c[0] == kind | nm.NFT_MSG_NEWCHAIN]
    rules = [c for c in changes if c[0] == kind | nm.NFT_MSG_NEWRULE]
    assert len(chains) == 4 + 2 and len(rules) == len(table.rules)  # ours, then PREROUTING and OUTPUT
    # "-A HEADRACE_SC_REDIRECT -p tcp ... -j REDIRECT --to-ports 15001"
    assert ["meta", "cmp", "match", "counter", "target"] in [expressions(r[3]) for r in rules]


@pytest.mark.parametrize(
    ("network", "exprs", "loaded"),
    [
        ("10.1.2.3/32", ["payload", "cmp"], 4),
        ("192.168.0.0/16", ["payload", "cmp"], 2),  # whole bytes: only those are loaded
        ("10.96.0.0/12", ["payload", "bitwise", "cmp"], 4),  # the prefix ends inside a byte
    ],
)
def test_an_address_loads_the_bytes_its_prefix_covers(network: str, exprs: list[str], loaded: int) -> None:
    table = read_fresh(f"*nat\n-A OUTPUT -d {network} -j RETURN\nCOMMIT\n", 4)
    (rule,) = [m for m in messages(nb.batch(table, 1)[0]) if m[0] & 0xFF == nm.NFT_MSG_NEWRULE]
    assert expressions(rule[3]) == [*exprs, "counter", "immediate"]
    assert struct.pack("!I", loaded) in rule[3]


def test_what_it_does_not_build_is_declined() -> None:
    with pytest.raises(Unsupported):
        nb.batch(read_fresh("*nat\n-A OUTPUT -d 0.0.0.0/0 -j RETURN\nCOMMIT\n", 4), 1)
    with pytest.raises(Unsupported):
        nb.batch(read_fresh("*raw\n-A OUTPUT -j RETURN\nCOMMIT\n", 4), 1)
    with pytest.raises(Unsupported):
        nb.batch(read_fresh("*mangle\n-A OUTPUT -m mark --mark 0x1 -j RETURN\nCOMMIT\n", 4), 1)
    with pytest.raises(Unsupported):
        nb.batch(read_fresh("*nat\n-A FORWARD -j RETURN\nCOMMIT\n", 4), 1)
