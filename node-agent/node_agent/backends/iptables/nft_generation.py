"""The nftables ruleset generation of a pod's netns: a cheap "nothing changed" for drift checks on nft hosts.

Every nf_tables commit in a network namespace bumps that netns' ruleset generation, whatever the table
(iptables-nft writes through nf_tables too); reads (`iptables-nft-save`, `nft list`) do not. So when a
pod's generation is the one recorded right after the iptables-save compare found its rules intact,
nothing in its netns was changed since, ours included, and the check can answer "intact" without
spawning anything. `iptc_check.DriftShortcut` does the recording and the fall-back; this module only
reads the number: one NFT_MSG_GETGEN request on a netfilter netlink socket made inside the pod netns.

The socket has to be created in the pod netns, and `setns` moves only the calling thread: each read runs
on a pooled thread that enters the netns, asks, and goes back (node_agent.kernel.netns_runner: the
agent's other threads never leave their netns). Request building and reply
parsing are pure and unit-tested.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence

from cni.kernel.netns import NetnsThreadTimeout
from cni.netlink import netlink_parse
from cni.netlink.netlink_parse import NLMSG_ERROR
from cni.netlink.nft_messages import NFNL_SUBSYS_NFTABLES, message
from node_agent.kernel.netns_runner import run_in_netns

NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1

_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id (big endian, 0 here)


class NftGenerationError(Exception):
    """The generation could not be read (the caller falls back to the iptables-save compare)."""


def getgen_request(seq: int) -> bytes:
    """An NFT_MSG_GETGEN request (AF_UNSPEC, nfnetlink version 0)."""
    return message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, socket.AF_UNSPEC, 0, seq, b"")


def parse_getgen_reply(data: bytes, seq: int) -> int:
    """The NFTA_GEN_ID of the NFT_MSG_NEWGEN answer to request `seq`; NftGenerationError otherwise."""
    try:
        for msg_type, msg_seq, payload in netlink_parse.messages(data):
            if msg_seq != seq:
                continue
            if msg_type == NLMSG_ERROR:
                err = netlink_parse.error_code(payload)
                raise NftGenerationError(f"netlink error: {os.strerror(err) if err > 0 else err}")
            if msg_type != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
                continue
            for attr_type, value in netlink_parse.attributes(payload[_NFGEN.size :]):
                if attr_type == NFTA_GEN_ID and len(value) >= 4:
                    return int(struct.unpack_from("!I", value)[0])
            raise NftGenerationError("NEWGEN answer without NFTA_GEN_ID")
    except netlink_parse.NetlinkParseError as exc:
        raise NftGenerationError(str(exc)) from None
    raise NftGenerationError("no NEWGEN answer")


def read_here(timeout: float = 2.0) -> int:
    """The ruleset generation of the calling thread's netns (the caller has entered the pod netns)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, netlink_parse.NETLINK_NETFILTER) as s:
        s.settimeout(timeout)
        s.bind((0, 0))
        seq = 1
        s.send(getgen_request(seq))
        return parse_getgen_reply(s.recv(65536), seq)


def read_generation(netns_path: str, timeout: float = 2.0) -> int:
    """The ruleset generation of the netns at netns_path (read from a thread that enters it)."""
    try:
        return run_in_netns(netns_path, lambda: read_here(timeout), timeout=timeout + 1.0)
    except NetnsThreadTimeout:
        raise NftGenerationError(f"no answer from {netns_path} within {timeout:.0f}s") from None
    except Exception as exc:  # the thread's error (cannot enter, netlink failed)
        raise NftGenerationError(str(exc)) from exc


class NftGenerationReader:
    """iptc_check.FingerprintReader for nft hosts: the fingerprint is the netns' ruleset generation."""

    def ready(self) -> bool:
        return True

    def start_loading(self) -> None:
        return None

    def fingerprint(self, netns_path: str, families: Sequence[int], prefix: str) -> bytes:
        try:
            return read_generation(netns_path).to_bytes(4, "big")
        except NftGenerationError as exc:
            raise ValueError(str(exc)) from exc
