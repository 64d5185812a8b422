"""traffic.sidecar.istio.io/* annotation validation (cni.contract.annotations)."""

from __future__ import annotations

import ipaddress

import pytest

from cni.contract import annotations as ann
from cni.contract.errors import INVALID_ANNOTATION, CniError
from cni.contract.spec import SidecarSpec


def test_no_annotations_gives_contract_defaults() -> None:
    assert ann.sidecar_spec({}) == SidecarSpec()


def test_all_annotations() -> None:
    spec = ann.sidecar_spec(
        {
            ann.INCLUDE_INBOUND_PORTS: "8080, 9090,8080",
            ann.EXCLUDE_INBOUND_PORTS: "7070",
            ann.EXCLUDE_OUTBOUND_PORTS: "5432,6379",
            ann.EXCLUDE_OUTBOUND_IP_RANGES: "10.96.0.0/12, fd00:1::/64",
            ann.INCLUDE_OUTBOUND_IP_RANGES: "10.0.0.0/8",
        }
    )
    assert spec.include_inbound_ports == (8080, 9090)
    assert spec.exclude_inbound_ports == (7070, 15020, 15021, 15090)
    assert spec.exclude_outbound_ports == (5432, 6379)
    assert spec.exclude_outbound_ranges == (
        ipaddress.ip_network("10.96.0.0/12"),
        ipaddress.ip_network("fd00:1::/64"),
    )
    assert spec.include_outbound_ranges == (ipaddress.ip_network("10.0.0.0/8"),)
    assert spec.ranges(6, "exclude") == (ipaddress.ip_network("fd00:1::/64"),)


def test_stars_and_empty_values() -> None:
    star = ann.sidecar_spec({ann.INCLUDE_INBOUND_PORTS: "*", ann.INCLUDE_OUTBOUND_IP_RANGES: "*"})
    assert star.include_inbound_ports is None and star.include_outbound_ranges is None
    empty = ann.sidecar_spec({ann.INCLUDE_INBOUND_PORTS: "", ann.INCLUDE_OUTBOUND_IP_RANGES: ""})
    assert empty.include_inbound_ports == () and empty.include_outbound_ranges == ()
    assert ann.sidecar_spec({ann.EXCLUDE_OUTBOUND_PORTS: ""}).exclude_outbound_ports == ()


def test_reserved_ports_stay_excluded() -> None:
    spec = ann.sidecar_spec({ann.INCLUDE_INBOUND_PORTS: "80,15021", ann.EXCLUDE_INBOUND_PORTS: "81"})
    assert spec.include_inbound_ports == (80,)
    assert {15020, 15021, 15090, 81} <= set(spec.exclude_inbound_ports)


@pytest.mark.parametrize(
    ("key", "value", "token"),
    [
        (ann.INCLUDE_INBOUND_PORTS, "80,0", "0"),
        (ann.INCLUDE_INBOUND_PORTS, "65536", "65536"),
        (ann.INCLUDE_INBOUND_PORTS, "80,*", "*"),
        (ann.INCLUDE_INBOUND_PORTS, "8 0", "8 0"),
        (ann.INCLUDE_INBOUND_PORTS, "80,,81", ""),
        (ann.INCLUDE_INBOUND_PORTS, "80,", ""),
        (ann.EXCLUDE_INBOUND_PORTS, "*", "*"),
        (ann.EXCLUDE_OUTBOUND_PORTS, "22;reboot", "22;reboot"),
        (ann.EXCLUDE_OUTBOUND_PORTS, "$(id)", "$(id)"),
        (ann.EXCLUDE_OUTBOUND_PORTS, "-1", "-1"),
        (ann.EXCLUDE_OUTBOUND_PORTS, "0x50", "0x50"),
        (ann.EXCLUDE_OUTBOUND_PORTS, "\u0668\u0660", "\u0668\u0660"),  # Arabic-Indic digits
        (ann.EXCLUDE_OUTBOUND_PORTS, "80\n-A OUTPUT -j ACCEPT", "80\n-A OUTPUT -j ACCEPT"),
        (ann.EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.1/8", "10.0.0.1/8"),
        (ann.EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.1", "10.0.0.1"),
        (ann.EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33", "10.0.0.0/33"),
        (ann.EXCLUDE_OUTBOUND_IP_RANGES, "*", "*"),
        (ann.EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8 -j ACCEPT", "10.0.0.0/8 -j ACCEPT"),
        (ann.EXCLUDE_OUTBOUND_IP_RANGES, "fe80::1%eth0/64", "fe80::1%eth0/64"),
        (ann.INCLUDE_OUTBOUND_IP_RANGES, "*,10.0.0.0/8", "*"),
        (ann.INCLUDE_OUTBOUND_IP_RANGES, "010.0.0.0/8", "010.0.0.0/8"),
        (ann.INCLUDE_OUTBOUND_IP_RANGES, " ", " "),
    ],
)
def test_rejected(key: str, value: str, token: str) -> None:
    with pytest.raises(CniError) as info:
        ann.sidecar_spec({key: value})
    assert info.value.code == INVALID_ANNOTATION
    assert key in info.value.msg
    assert repr(token) in info.value.msg


def test_huge_lists_rejected() -> None:
    value = ",".join(str(p) for p in range(1, 300))
    with pytest.raises(CniError, match="more than 256 entries"):
        ann.sidecar_spec({ann.EXCLUDE_OUTBOUND_PORTS: value})
    with pytest.raises(CniError, match="longer than"):
        ann.sidecar_spec({ann.EXCLUDE_OUTBOUND_PORTS: "1" * 20000})
    ok = ",".join(str(p) for p in range(1, 257))
    assert len(ann.sidecar_spec({ann.EXCLUDE_OUTBOUND_PORTS: ok}).exclude_outbound_ports) == 256


def test_interception_mode() -> None:
    assert ann.sidecar_spec({}).interception_mode == "REDIRECT"
    assert ann.sidecar_spec({ann.INTERCEPTION_MODE: "REDIRECT"}).interception_mode == "REDIRECT"
    spec = ann.sidecar_spec({ann.INTERCEPTION_MODE: "TPROXY", ann.INCLUDE_INBOUND_PORTS: "80"})
    assert spec.interception_mode == "TPROXY" and spec.include_inbound_ports == (80,)
    # the plugin's light form carries the same value
    assert ann.sidecar_params({ann.INTERCEPTION_MODE: "TPROXY"}).interception_mode == "TPROXY"
    assert ann.INTERCEPTION_MODE in ann.KNOWN  # the agent re-applies when it changes


@pytest.mark.parametrize("value", ["tproxy", "Redirect", " TPROXY", "TPROXY ", "", "NONE", "TPROXY;id", "T" * 100])
def test_interception_mode_rejected(value: str) -> None:
    with pytest.raises(CniError) as info:
        ann.sidecar_params({ann.INTERCEPTION_MODE: value})
    assert info.value.code == INVALID_ANNOTATION
    assert ann.INTERCEPTION_MODE in info.value.msg
    assert "REDIRECT" in info.value.details and "TPROXY" in info.value.details
    assert len(info.value.msg) < 200
    if value == "NONE":  # membership makes such a pod a pass-through pod: it never reaches a spec
        assert "no redirection" in info.value.msg


def test_include_outbound_ports_and_interfaces() -> None:
    spec = ann.sidecar_spec(
        {
            ann.INCLUDE_OUTBOUND_PORTS: "32000, 31000,32000",
            ann.EXCLUDE_INTERFACES: "net1,eth9, net1",
            ann.KUBEVIRT_INTERFACES: "eth1",
        }
    )
    assert spec.include_outbound_ports == (31000, 32000)
    assert spec.exclude_interfaces == ("net1", "eth9")
    assert spec.kubevirt_interfaces == ("eth1",)
    params = ann.sidecar_params({ann.INCLUDE_OUTBOUND_PORTS: "80", ann.EXCLUDE_INTERFACES: ""})
    assert params.include_outbound_ports == (80,) and params.exclude_interfaces == ()
    # the newer name wins over kubevirtInterfaces; both are validated
    both = ann.sidecar_spec({ann.KUBEVIRT_INTERFACES: "eth1", ann.REROUTE_VIRTUAL_INTERFACES: "virt0"})
    assert both.kubevirt_interfaces == ("virt0",)
    with pytest.raises(CniError):
        ann.sidecar_spec({ann.KUBEVIRT_INTERFACES: "1bad", ann.REROUTE_VIRTUAL_INTERFACES: "virt0"})
    assert {ann.INCLUDE_OUTBOUND_PORTS, ann.EXCLUDE_INTERFACES, ann.KUBEVIRT_INTERFACES} <= set(ann.KNOWN)
    assert ann.sidecar_spec({}).include_outbound_ports == ()


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        (ann.INCLUDE_OUTBOUND_PORTS, "*", "'*' not allowed"),
        (ann.INCLUDE_OUTBOUND_PORTS, "0", "out of range"),
        (ann.INCLUDE_OUTBOUND_PORTS, "80;id", "not a port"),
        (ann.EXCLUDE_INTERFACES, "eth0 eth1", "not an interface name"),
        (ann.EXCLUDE_INTERFACES, "0eth", "not an interface name"),
        (ann.EXCLUDE_INTERFACES, "eth$(id)", "not an interface name"),
        (ann.EXCLUDE_INTERFACES, "a" * 16, "longer than 15"),
        (ann.EXCLUDE_INTERFACES, "eth0,,eth1", "empty entry"),
        (ann.KUBEVIRT_INTERFACES, "*", "'*' not allowed"),
        (ann.KUBEVIRT_INTERFACES, "eth/1", "not an interface name"),
    ],
)
def test_new_annotations_rejected(key: str, value: str, why: str) -> None:
    with pytest.raises(CniError) as info:
        ann.sidecar_params({key: value})
    assert info.value.code == INVALID_ANNOTATION
    assert key in info.value.msg and why in info.value.msg
    expected = "interface names" if key.endswith("Interfaces") else "ports 1-65535"
    assert expected in info.value.details
