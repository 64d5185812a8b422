"""Socket helpers of the reference proxy: listeners, marked upstream sockets, original destination.

The factories run on a thread inside the pod netns (the proxy's loop thread for a moment, or the
workload's NetnsWorker); the parsers are pure.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

BYPASS_MARK = 0x539  # contract: the pod's redirect rules never capture traffic of sockets with this mark
SO_MARK = getattr(socket, "SO_MARK", 36)
SO_ORIGINAL_DST = 80  # on SOL_IP; IP6T_SO_ORIGINAL_DST has the same value on SOL_IPV6 (= IPPROTO_IPV6)
IP_TRANSPARENT = 19  # on SOL_IP
IPV6_TRANSPARENT = 75  # on SOL_IPV6
SOCKADDR_IN_LEN = 16
SOCKADDR_IN6_LEN = 28

OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
HBONE_PORT = 15008


def parse_sockaddr_in(raw: bytes) -> tuple[str, int]:
    """struct sockaddr_in (family host-endian, port and address network-endian) -> (ip, port)."""
    if len(raw) < 8:
        raise ValueError(f"sockaddr_in too short: {len(raw)} bytes")
    (family,) = struct.unpack("=H", raw[:2])
    if family != socket.AF_INET:
        raise ValueError(f"sockaddr_in has family {family}, expected AF_INET")
    (port,) = struct.unpack("!H", raw[2:4])
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


def parse_sockaddr_in6(raw: bytes) -> tuple[str, int]:
    """struct sockaddr_in6 (family, port, flowinfo, addr[16], scope_id) -> (ip, port)."""
    if len(raw) < 24:
        raise ValueError(f"sockaddr_in6 too short: {len(raw)} bytes")
    (family,) = struct.unpack("=H", raw[:2])
    if family != socket.AF_INET6:
        raise ValueError(f"sockaddr_in6 has family {family}, expected AF_INET6")
    (port,) = struct.unpack("!H", raw[2:4])
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination the client dialled before REDIRECT rewrote it (OSError when not redirected)."""
    if sock.family == socket.AF_INET6:
        return parse_sockaddr_in6(sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, SOCKADDR_IN6_LEN))
    return parse_sockaddr_in(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_LEN))


def format_addr(ip: str, port: int) -> str:
    """ip:port, IPv6 in brackets ([fd00::1]:80)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def make_listener(family: socket.AddressFamily, port: int) -> socket.socket:
    """A non-blocking TCP listener on the wildcard address, in the calling thread's netns."""
    s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(("::", port))
        else:
            s.bind(("0.0.0.0", port))
        s.listen(512)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


# per (port, family): the listener, or the error that refused it
Listeners = list[tuple[int, socket.AddressFamily, socket.socket | OSError]]


def make_listeners(ports: Sequence[int]) -> Listeners:
    """Every port's IPv4 and IPv6 listener (`make_listener`), made in one go in the calling thread's netns:
    per (port, family) the socket or the error that refused it. The caller keeps or closes them all."""
    made: Listeners = []
    for port in ports:
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                made.append((port, family, make_listener(family, port)))
            except OSError as exc:
                made.append((port, family, exc))
    return made


def make_upstream(family: socket.AddressFamily, source: str | None = None) -> socket.socket:
    """A non-blocking TCP socket carrying the bypass mark, in the calling thread's netns (unconnected).
    `source`: bound to that (foreign) address with IP_TRANSPARENT, as ztunnel delivers inbound with the
    client's original source; the pod's ambient policy routing brings the app's replies back to it."""
    s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_MARK, BYPASS_MARK)
        if source is not None:
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            else:
                s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            s.bind((source, 0))
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s
