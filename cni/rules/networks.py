"""An IP network's bytes from its text without `ipaddress` (pure; its import costs the CNI plugin
milliseconds): the in-process nf_tables batch builders lay addresses out with it."""

from __future__ import annotations

from _socket import AF_INET, AF_INET6, inet_pton

SOCKET_FAMILIES = {4: AF_INET, 6: AF_INET6}


def network(text: str, family: int, strict: bool = True) -> tuple[bytes, bytes]:
    """(address, mask) of `address[/prefix]` of one family, as `ipaddress.ip_network(text, strict)` reads
    it: host bits set are refused (strict) or cleared. ValueError for what that refuses (and for the few
    forms it takes that inet_pton does not, e.g. an IPv6 scope)."""
    addr, sep, prefix = text.partition("/")
    size = 4 if family == 4 else 16
    try:
        packed = inet_pton(SOCKET_FAMILIES[family], addr)
    except OSError:
        raise ValueError(f"not an IPv{family} address: {addr!r}") from None
    if sep and not (prefix.isascii() and prefix.isdigit() and int(prefix) <= size * 8):
        raise ValueError(f"bad prefix length {prefix!r}")
    bits = int(prefix) if sep else size * 8
    mask = (((1 << bits) - 1) << (size * 8 - bits)).to_bytes(size, "big")
    value, bitmask = int.from_bytes(packed, "big"), int.from_bytes(mask, "big")
    if value & ~bitmask:
        if strict:
            raise ValueError(f"{text!r} has host bits set")
        packed = (value & bitmask).to_bytes(size, "big")
    return packed, mask
