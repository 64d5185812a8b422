"""The in-process address reader (pure part): the dump request, and which addresses of a reply count."""

from __future__ import annotations

import ipaddress
import socket
import struct

from node_agent.kernel import netns_addresses as na

from cni.kernel.loopback_address import IFA_LOCAL

IFADDRMSG = struct.Struct("=BBBBI")
V4, V6 = socket.AF_INET, socket.AF_INET6
HOST_SCOPE, LINK_SCOPE = 254, 253


def attr(kind: int, raw: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(raw), kind) + raw + b"\0" * (-len(raw) % 4)


def payload(family: int, index: int, address: str, *, scope: int = 0, local: str | None = None) -> bytes:
    body = IFADDRMSG.pack(family, 24, 0, scope, index) + attr(na.IFA_ADDRESS, ipaddress.ip_address(address).packed)
    if local is not None:
        body += attr(IFA_LOCAL, ipaddress.ip_address(local).packed)
    return body


def test_dump_request_asks_for_both_families() -> None:
    req = na.dump_request(5)
    assert struct.unpack_from("=IHHII", req) == (24, na.RTM_GETADDR, 0x301, 5, 0)
    assert IFADDRMSG.unpack_from(req, 16) == (socket.AF_UNSPEC, 0, 0, 0, 0)


def test_only_global_unicast_addresses_off_lo_count() -> None:
    assert na.parse_address(payload(V4, 2, "10.1.2.3")) == (2, V4, "10.1.2.3")
    assert na.parse_address(payload(V6, 2, "fd00::3")) == (2, V6, "fd00::3")
    assert na.parse_address(payload(V6, 1, "::6")) is None  # on lo (a sidecar's passthrough source)
    assert na.parse_address(payload(V4, 2, "127.0.0.9", scope=HOST_SCOPE)) is None
    assert na.parse_address(payload(V6, 2, "fe80::1", scope=LINK_SCOPE)) is None
    assert na.parse_address(payload(V4, 2, "169.254.3.3")) is None  # link-local, even with scope global
    assert na.parse_address(payload(V4, 2, "10.9.9.9", local="10.1.1.1")) == (2, V4, "10.1.1.1")  # its own end
    assert na.parse_address(IFADDRMSG.pack(V4, 24, 0, 0, 2)) is None  # no address attribute
    assert na.parse_address(IFADDRMSG.pack(V4, 24, 0, 0, 2) + attr(na.IFA_ADDRESS, b"\x0a\x00")) is None  # short
    assert na.parse_address(b"\x02\x18") is None
    assert na.parse_address(IFADDRMSG.pack(17, 0, 0, 0, 2) + attr(na.IFA_ADDRESS, b"\0" * 6)) is None  # AF_PACKET


def test_addresses_come_link_by_link_ipv4_first_each_once() -> None:
    dump = [
        payload(V4, 3, "10.1.1.3"),
        payload(V4, 2, "10.1.1.2"),
        payload(V6, 3, "fd00::3"),
        payload(V6, 2, "fd00::b"),
        payload(V6, 2, "fd00::a"),
        payload(V6, 4, "fd00::b"),  # the same address on another link: once
        payload(V6, 1, "::6"),
    ]
    assert na.global_addresses(dump) == ("10.1.1.2", "fd00::b", "fd00::a", "10.1.1.3", "fd00::3")
    assert na.global_addresses([]) == ()
