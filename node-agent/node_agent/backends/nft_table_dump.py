"""The nf_tables tables of the calling thread's network namespace: one NFT_MSG_GETTABLE dump on a netfilter
netlink socket, no libnftables context and no ruleset listing.

A pod netns being enrolled mostly holds no table at all, and one holding our rules only iptables-nft's
tables or ours; then it holds no foreign chain, and the agent skips the full ruleset read
(`nft_foreign`). Request building and reply parsing are pure and unit-tested; `tables_here` runs in
whatever netns the calling thread is in.
"""

from __future__ import annotations

import socket
import struct

from cni.netlink import netlink_parse
from cni.netlink.netlink_parse import NETLINK_NETFILTER
from cni.netlink.nft_messages import NFNL_SUBSYS_NFTABLES, NFT_MSG_NEWTABLE, message

NFT_MSG_GETTABLE = 1
NFTA_TABLE_NAME = 1
NLM_F_DUMP = 0x300
FAMILY_NAMES = {socket.AF_INET: "ip", socket.AF_INET6: "ip6", 1: "inet", 3: "arp", 7: "bridge", 5: "netdev"}

_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id


class NftTableDumpError(Exception):
    """The dump could not be made or read (the caller reads the ruleset the long way)."""


def dump_request(seq: int) -> bytes:
    """An NFT_MSG_GETTABLE dump of every family."""
    return message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE, socket.AF_UNSPEC, NLM_F_DUMP, seq, b"")


def parse_reply(data: bytes, seq: int) -> tuple[list[tuple[str, str]], bool]:
    """((family, name) of each table in one read of the answer to `seq`, whether the dump is done)."""
    try:
        answers, done = netlink_parse.dump_answers(data, seq)
    except (netlink_parse.NetlinkAnswerError, netlink_parse.NetlinkParseError) as exc:
        raise NftTableDumpError(str(exc)) from None
    out: list[tuple[str, str]] = []
    for msg_type, payload in answers:
        if msg_type != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE or len(payload) < _NFGEN.size:
            continue
        family = FAMILY_NAMES.get(payload[0], str(payload[0]))
        names = [v for t, v in netlink_parse.attributes(payload[_NFGEN.size :]) if t == NFTA_TABLE_NAME]
        out.append((family, names[0].rstrip(b"\0").decode(errors="replace") if names else ""))
    return out, done


def tables_here(timeout: float = 2.0) -> list[tuple[str, str]]:
    """(family, name) of every nf_tables table in the calling thread's netns."""
    seq, tables = 1, []
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER) as s:
            s.settimeout(timeout)
            s.bind((0, 0))
            s.send(dump_request(seq))
            while True:
                got, done = parse_reply(s.recv(1 << 16), seq)
                tables += got
                if done:
                    return tables
    except OSError as exc:
        raise NftTableDumpError(f"nf_tables table dump: {exc.strerror or exc}") from exc
