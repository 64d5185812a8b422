"""Which tables the in-process removal of a fresh write empties, and the nft batch deleting them (pure; the
kernel tests in test_nft_generation.py and test_iptables_fresh_write.py remove real ones)."""

from __future__ import annotations

from node_agent.backends.iptables.fresh_remove import delete_batch, tables_of

from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.netlink import netlink_parse
from cni.netlink import nft_messages as nm
from tests.unit.netlink_batch import families, messages


def test_a_redirect_sidecar_write_is_its_nat_tables() -> None:
    assert tables_of(SidecarSpec(), (4, 6)) == [(4, "nat"), (6, "nat")]
    assert tables_of(SidecarSpec(), (4,)) == [(4, "nat")]


def test_an_ambient_write_is_its_mangle_and_nat_tables() -> None:
    assert tables_of(AmbientSpec(), (4, 6)) == [(4, "mangle"), (4, "nat"), (6, "mangle"), (6, "nat")]
    assert tables_of(AmbientSpec(capture_dns=True), (6,)) == [(6, "mangle"), (6, "nat")]


def test_a_tproxy_sidecar_is_not_removed_here() -> None:
    assert tables_of(SidecarSpec(interception_mode="TPROXY"), (4,)) is None


def test_one_transaction_deletes_them_by_family_and_name() -> None:
    data, acked = delete_batch([(4, "nat"), (6, "nat")])
    msgs = messages(data)
    assert msgs[0][0] == nm.NFNL_MSG_BATCH_BEGIN and msgs[-1][0] == nm.NFNL_MSG_BATCH_END
    deletes = msgs[1:-1]
    assert [m[0] & 0xFF for m in deletes] == [nm.NFT_MSG_DELTABLE] * 2
    assert [m[2] for m in deletes if m[1] & nm.NLM_F_ACK] == [acked]
    assert families(data)[1:-1] == [nm.NFPROTO_IPV4, nm.NFPROTO_IPV6]
    assert all(dict(netlink_parse.attributes(m[3]))[1] == b"nat\0" for m in deletes)


def test_the_delete_may_name_the_generation_it_was_made_for() -> None:
    begin = messages(delete_batch([(4, "nat")], genid=0x01020304)[0])[0]
    assert begin[0] == nm.NFNL_MSG_BATCH_BEGIN
    assert dict(netlink_parse.attributes(begin[3])) == {nm.NFNL_BATCH_GENID: b"\x01\x02\x03\x04"}
    assert messages(delete_batch([(4, "nat")])[0])[0][3] == b""  # no generation: no attribute
