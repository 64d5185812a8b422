"""prevResult validation and conversion between CNI 0.4.0, 1.0.0 and 1.1.0 (cni.plugin.result)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from cni.contract.errors import INVALID_NETWORK_CONFIG, CniError
from cni.plugin import result as cni_result

R040: dict[str, Any] = {
    "cniVersion": "0.4.0",
    "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/run/netns/p"}],
    "ips": [
        {"version": "4", "interface": 0, "address": "10.1.0.5/24", "gateway": "10.1.0.1"},
        {"version": "6", "interface": 0, "address": "fd00::5/64", "gateway": "fd00::1"},
    ],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {"nameservers": ["10.0.0.10"]},
}
R110: dict[str, Any] = {
    "cniVersion": "1.1.0",
    "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/run/netns/p", "mtu": 1500}],
    "ips": [{"interface": 0, "address": "10.1.0.5/24", "gateway": "10.1.0.1"}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1", "mtu": 1400, "table": 5}],
    "dns": {},
    "vendorThing": {"x": 1},
}


def test_same_version_is_unchanged() -> None:
    for r in (R040, R110):
        version = cni_result.validate(r, "1.0.0")
        assert cni_result.convert(r, version, version) == r


def test_040_to_100_drops_ip_version() -> None:
    out = cni_result.convert(R040, "0.4.0", "1.0.0")
    assert out["cniVersion"] == "1.0.0"
    assert out["ips"][0] == {"interface": 0, "address": "10.1.0.5/24", "gateway": "10.1.0.1"}
    assert out["interfaces"] == R040["interfaces"] and out["routes"] == R040["routes"]


def test_110_to_040_adds_version_and_drops_new_fields() -> None:
    out = cni_result.convert(R110, "1.1.0", "0.4.0")
    assert out["ips"][0]["version"] == "4"
    assert "mtu" not in out["interfaces"][0]
    assert out["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}]
    assert "vendorThing" not in out


def test_110_to_100_and_back_roundtrip_of_shared_fields() -> None:
    down = cni_result.convert(R110, "1.1.0", "1.0.0")
    assert down["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}]
    up = cni_result.convert(down, "1.0.0", "1.1.0")
    assert up["ips"] == R110["ips"]


def test_input_not_mutated() -> None:
    before = copy.deepcopy(R040)
    cni_result.convert(R040, "0.4.0", "1.1.0")
    assert before == R040


def test_families_and_addresses() -> None:
    assert cni_result.families(R040) == (4, 6)
    assert cni_result.families(R110) == (4,)
    assert cni_result.families({"ips": []}) == (4, 6)
    assert cni_result.addresses(R040) == ["10.1.0.5", "fd00::5"]


@pytest.mark.parametrize(
    "bad",
    [
        {"cniVersion": "7.0.0"},
        {"interfaces": "eth0"},
        {"ips": {}},
        {"ips": ["10.0.0.1/24"]},
        {"ips": [{"address": 5}]},
        {"ips": [{"address": "10.0.0.300/24"}]},
        {"ips": [{"address": "10.0.0.3"}]},
        {"ips": [{"address": "10.0.0.3/24", "gateway": "nope"}]},
        {"ips": [{"address": "10.0.0.3/24", "interface": 3}]},
        {"ips": [{"address": "10.0.0.3/24", "interface": True}], "interfaces": [{}]},
        {"cniVersion": "0.4.0", "ips": [{"version": "6", "address": "10.0.0.3/24"}]},
        {"routes": [1]},
        {"dns": []},
    ],
)
def test_invalid_prev_result(bad: dict[str, Any]) -> None:
    with pytest.raises(CniError) as info:
        cni_result.validate(bad, "1.0.0")
    assert info.value.code == INVALID_NETWORK_CONFIG
    assert "prevResult" in info.value.msg
