"""The nftables golden scenarios: spec + families → the pod's table (shared by the golden test and the
kernel round-trip test, which loads every scenario and compares nft's listing with the text)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.rules import nft_builder
from cni.rules.nft_text import NftTable

net = ipaddress.ip_network


def _sidecar(spec: SidecarSpec, *families: int) -> Callable[[], NftTable]:
    return lambda: nft_builder.sidecar_table(spec, families)


def _ambient(spec: AmbientSpec, *families: int) -> Callable[[], NftTable]:
    return lambda: nft_builder.ambient_table(spec, families)


def _node(ips: list[str]) -> Callable[[], NftTable]:
    def build() -> NftTable:
        table = nft_builder.node_probe_table(ips)
        assert table is not None
        return table

    return build


SCENARIOS: dict[str, Callable[[], NftTable]] = {
    "sidecar_default": _sidecar(SidecarSpec(), 4, 6),
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
    "sidecar_include_ranges_v4_only": _sidecar(SidecarSpec(include_outbound_ranges=(net("10.0.0.0/8"),)), 4, 6),
    "sidecar_tproxy": _sidecar(SidecarSpec(interception_mode="TPROXY"), 4, 6),
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
    "sidecar_interfaces": _sidecar(
        SidecarSpec(exclude_interfaces=("net1",), kubevirt_interfaces=("eth1", "eth2")), 4, 6
    ),
    "sidecar_kubevirt_ranges": _sidecar(
        SidecarSpec(kubevirt_interfaces=("eth1",), include_outbound_ranges=(net("10.0.0.0/8"), net("fd00::/8"))), 4, 6
    ),
    "sidecar_tproxy_interfaces": _sidecar(
        SidecarSpec(interception_mode="TPROXY", exclude_interfaces=("net1",), kubevirt_interfaces=("eth1",)), 4, 6
    ),
    "ambient_default": _ambient(AmbientSpec(), 4, 6),
    "ambient_default_v6": _ambient(AmbientSpec(), 6),
    "ambient_dns": _ambient(AmbientSpec(capture_dns=True), 4, 6),
    "ambient_exclusions": _ambient(
        AmbientSpec(
            exclude_inbound_ports=(22,),
            exclude_outbound_ports=(5432,),
            exclude_outbound_ranges=(net("10.96.0.0/12"), net("fd00:10:96::/112")),
        ),
        4,
        6,
    ),
    "node_probe_snat": _node(["10.200.3.7", "10.200.3.5", "fd00:200::5", "10.200.3.5"]),
}
