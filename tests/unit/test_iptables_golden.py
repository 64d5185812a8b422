"""Golden files of the iptables rule builder: one per scenario, compared exactly.

Regenerate after an intended change with `HEADRACE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest
tests/unit/test_iptables_golden.py` and review the diff.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path

import pytest

from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.rules import builder
from tests.unit.golden import assert_golden

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "golden" / "iptables"
net = ipaddress.ip_network


def _sidecar(spec: SidecarSpec, *families: int) -> Callable[[], str]:
    return lambda: "".join(builder.sidecar_rules(spec, f).render() for f in families)  # type: ignore[arg-type]


def _ambient(spec: AmbientSpec, *families: int) -> Callable[[], str]:
    return lambda: "".join(builder.ambient_rules(spec, f).render() for f in families)  # type: ignore[arg-type]


def _node(ips: list[str]) -> Callable[[], str]:
    return lambda: "".join(builder.node_probe_rules(ips, f).render() for f in (4, 6))


SCENARIOS: dict[str, Callable[[], str]] = {
    "sidecar_default_v4": _sidecar(SidecarSpec(), 4),
    "sidecar_default_v6": _sidecar(SidecarSpec(), 6),
    "sidecar_exclude_inbound": _sidecar(SidecarSpec(exclude_inbound_ports=(22, 9000)), 4, 6),
    "sidecar_include_inbound": _sidecar(SidecarSpec(include_inbound_ports=(80, 8080)), 4, 6),
    "sidecar_no_inbound": _sidecar(SidecarSpec(include_inbound_ports=()), 4),
    "sidecar_exclude_outbound": _sidecar(
        SidecarSpec(
            exclude_outbound_ports=(5432, 6379),
            exclude_outbound_ranges=(net("10.96.0.0/12"), net("192.168.0.0/16"), net("fd00:10:96::/112")),
        ),
        4,
        6,
    ),
    "sidecar_include_ranges": _sidecar(
        SidecarSpec(
            include_outbound_ranges=(net("10.0.0.0/8"), net("fd00::/8")),
            exclude_outbound_ranges=(net("10.1.0.0/16"),),
        ),
        4,
        6,
    ),
    "sidecar_tproxy_v4": _sidecar(SidecarSpec(interception_mode="TPROXY"), 4),
    "sidecar_tproxy_v6": _sidecar(SidecarSpec(interception_mode="TPROXY"), 6),
    "sidecar_tproxy_include_inbound": _sidecar(
        SidecarSpec(interception_mode="TPROXY", include_inbound_ports=(80, 8080)), 4, 6
    ),
    "sidecar_tproxy_exclude_inbound": _sidecar(
        SidecarSpec(interception_mode="TPROXY", exclude_inbound_ports=(22, 9000), exclude_outbound_ports=(5432,)), 4
    ),
    "sidecar_include_outbound_ports": _sidecar(
        SidecarSpec(include_outbound_ports=(31000, 32000), include_outbound_ranges=()), 4, 6
    ),
    "sidecar_include_outbound_ports_ranges": _sidecar(
        SidecarSpec(
            include_outbound_ports=(5432,),
            include_outbound_ranges=(net("10.0.0.0/8"),),
            exclude_outbound_ranges=(net("10.1.0.0/16"),),
        ),
        4,
    ),
    "sidecar_exclude_interfaces": _sidecar(SidecarSpec(exclude_interfaces=("net1", "eth9")), 4, 6),
    "sidecar_kubevirt_interfaces": _sidecar(SidecarSpec(kubevirt_interfaces=("eth1", "eth2")), 4, 6),
    "sidecar_kubevirt_interfaces_ranges": _sidecar(
        SidecarSpec(
            kubevirt_interfaces=("eth1",),
            exclude_interfaces=("net1",),
            include_outbound_ranges=(net("10.0.0.0/8"), net("fd00::/8")),
        ),
        4,
        6,
    ),
    "sidecar_kubevirt_no_inbound": _sidecar(
        SidecarSpec(kubevirt_interfaces=("eth1",), include_inbound_ports=()), 4
    ),
    "sidecar_tproxy_interfaces": _sidecar(
        SidecarSpec(interception_mode="TPROXY", exclude_interfaces=("net1",), kubevirt_interfaces=("eth1",)), 4
    ),
    "ambient_default_v4": _ambient(AmbientSpec(), 4),
    "ambient_default_v6": _ambient(AmbientSpec(), 6),
    "ambient_dns": _ambient(AmbientSpec(capture_dns=True), 4, 6),
    "node_probe_snat": _node(["10.200.3.7", "10.200.3.5", "fd00:200::5", "10.200.3.5"]),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_golden(name: str) -> None:
    text = SCENARIOS[name]()
    assert_golden(GOLDEN_DIR / f"{name}.golden", text)


def test_no_stale_golden_files() -> None:
    on_disk = {p.stem for p in GOLDEN_DIR.glob("*.golden")}
    assert on_disk <= set(SCENARIOS), f"golden files without a scenario: {sorted(on_disk - set(SCENARIOS))}"
