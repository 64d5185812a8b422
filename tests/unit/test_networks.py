"""`cni.rules.networks.network` reads an address text as `ipaddress.ip_network` does (pure)."""

from __future__ import annotations

import ipaddress
import random

import pytest

from cni.rules.networks import network


@pytest.mark.parametrize(("text", "family"), [
    ("127.0.0.1", 4), ("10.0.0.0/8", 4), ("10.1.0.0/16", 4), ("192.168.0.128/25", 4), ("0.0.0.0/0", 4),
    ("10.0.0.0/008", 4), ("::1", 6), ("::6", 6), ("fd00::/8", 6), ("fd00:1:2::/63", 6), ("::ffff:1.2.3.4", 6),
    ("FD00::/8", 6), ("::/0", 6),
])
def test_network_reads_an_address_as_ipaddress_does(text: str, family: int) -> None:
    net = ipaddress.ip_network(text, strict=True)
    assert network(text, family) == (net.network_address.packed, net.netmask.packed)


@pytest.mark.parametrize(("text", "family"), [
    ("10.0.0.1/8", 4), ("10.0.0.0/33", 4), ("10.0.0.0/", 4), ("10.0.0.0/-1", 4), ("10.0.0.0/\u00b2", 4),
    ("010.0.0.0/8", 4), ("10.0.0", 4), ("fd00::1/8", 6), ("::1", 4), ("127.0.0.1", 6), ("fd00::/129", 6),
    ("", 4), ("10.0.0.0/8/8", 4),
])
def test_network_refuses_what_ipaddress_refuses(text: str, family: int) -> None:
    with pytest.raises(ValueError):
        network(text, family)
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError:
        return
    assert net.version != family


def test_network_fuzz_against_ipaddress() -> None:
    rng = random.Random(11)
    for _ in range(3000):
        family = rng.choice((4, 6))
        size = 32 if family == 4 else 128
        raw = rng.getrandbits(size)
        bits = rng.randrange(size + 1)
        if rng.random() < 0.7:  # mostly valid networks: host bits cleared
            raw &= ~((1 << (size - bits)) - 1)
        addr = ipaddress.IPv4Address(raw) if family == 4 else ipaddress.IPv6Address(raw)
        text = f"{addr}/{bits}"
        for strict in (True, False):
            try:
                net = ipaddress.ip_network(text, strict=strict)
            except ValueError:
                with pytest.raises(ValueError):
                    network(text, family, strict)
                continue
            assert network(text, family, strict) == (net.network_address.packed, net.netmask.packed), text


def test_host_bits_are_cleared_when_not_strict() -> None:
    assert network("10.1.2.3/8", 4, strict=False) == (bytes((10, 0, 0, 0)), bytes((255, 0, 0, 0)))
