"""The global unicast addresses inside a network namespace, read in-process: one rtnetlink address dump
from a pooled thread that enters it (node_agent.kernel.netns_runner).

What for: the IPs a pod is enrolled with when neither its pod object nor a CNI ADD brought any (the
agent finds a pod's netns through its infra process, often before the kubelet writes its IPs), and the
addresses the named-netns matcher compares with a pod's IPs. Each pass looks again at every pod still
without IPs; through `nsenter ip -j addr show` that was a process per pod and look, with the agent's
lock held.

Which addresses: scope global (RT_SCOPE_UNIVERSE), not on `lo` (interface index 1 in every netns, where
a dual-stack sidecar's passthrough source ::6 lives), not link-local; link by link in interface order,
IPv4 before IPv6 (the order `ip addr show` prints them), each once. Request building and reply parsing
are pure (unit-tested).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from cni.kernel.loopback_address import IFA_LOCAL, IFADDRMSG, LOOPBACK_INDEX, NLM_F_REQUEST, RTM_NEWADDR
from cni.kernel.netns import NetnsThreadTimeout
from cni.netlink import netlink_parse
from node_agent.kernel.netns_runner import run_in_netns
from node_agent.kernel.policy_routes_read import NLM_F_DUMP

RTM_GETADDR = 22
IFA_ADDRESS = 1
RT_SCOPE_UNIVERSE = 0
_RAW_LEN = {socket.AF_INET: 4, socket.AF_INET6: 16}


def dump_request(seq: int) -> bytes:
    """An address dump of both families."""
    body = IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    hdr = netlink_parse.NLMSGHDR
    return hdr.pack(hdr.size + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def parse_address(payload: bytes) -> tuple[int, int, str] | None:
    """(interface index, family, address) of one RTM_NEWADDR payload when it is a global unicast address
    off `lo`; else None. The address is IFA_LOCAL's (an IPv4 point-to-point link's own end), else
    IFA_ADDRESS's."""
    if len(payload) < IFADDRMSG.size:
        return None
    family, _prefix, _flags, scope, index = IFADDRMSG.unpack_from(payload)
    if scope != RT_SCOPE_UNIVERSE or index == LOOPBACK_INDEX or family not in _RAW_LEN:
        return None
    attrs = dict(netlink_parse.attributes(payload[IFADDRMSG.size :]))
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
    if raw is None or len(raw) != _RAW_LEN[family]:
        return None
    ip = ipaddress.ip_address(raw)
    return None if ip.is_link_local else (index, family, str(ip))


def global_addresses(payloads: Iterable[bytes]) -> tuple[str, ...]:
    """The addresses of a dump's RTM_NEWADDR payloads, in `ip addr show`'s order, each once."""
    found = [a for a in map(parse_address, payloads) if a is not None]
    found.sort(key=lambda a: (a[0], a[1] != socket.AF_INET))  # stable: the kernel's order within a family
    return tuple(dict.fromkeys(ip for _index, _family, ip in found))


def read_here(timeout: float = 2.0) -> tuple[str, ...]:
    """The calling thread's netns' global addresses (the caller has entered it). OSError when the dump
    fails; NetlinkParseError (a ValueError) on a reply that does not parse."""
    seq = 1
    payloads: list[bytes] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as s:
        s.settimeout(timeout)
        s.bind((0, 0))
        s.send(dump_request(seq))
        done = False
        while not done:
            try:
                answers, done = netlink_parse.dump_answers(s.recv(1 << 16), seq)
            except netlink_parse.NetlinkAnswerError as exc:
                raise OSError(exc.code, f"address dump: {exc}") from None
            payloads += [payload for msg_type, payload in answers if msg_type == RTM_NEWADDR]
    return global_addresses(payloads)


def read_addresses(netns_path: str, timeout: float = 2.0) -> tuple[str, ...]:
    """The global addresses inside the netns at `netns_path`. OSError when it cannot be entered or read
    (in time)."""
    try:
        return run_in_netns(netns_path, lambda: read_here(timeout), timeout=timeout + 1.0)
    except NetnsThreadTimeout:
        raise OSError(f"addresses of {netns_path}: no answer within {timeout:.0f}s") from None
    except ValueError as exc:
        raise OSError(f"addresses of {netns_path}: {exc}") from exc
