"""What to redirect in a pod: the validated, immutable inputs of every redirection backend.

Pure data. Built from the contract defaults (cni/contract/constants.py) plus a pod's annotations
(cni.contract.annotations); consumed by the iptables rule builder and the eBPF backend alike, so both
backends implement exactly the same spec.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from cni.contract.constants import (
    AMBIENT_DNS_PORT,
    AMBIENT_HBONE_PORT,
    AMBIENT_INBOUND_PORT,
    AMBIENT_MARK,
    AMBIENT_MARK_MASK,
    AMBIENT_OUTBOUND_PORT,
    INTERCEPTION_REDIRECT,
    PROBE_SNAT_V4_TEXT,
    PROBE_SNAT_V6_TEXT,
    PROXY_GID,
    PROXY_UID,
    SIDECAR_EXCLUDED_INBOUND,
    SIDECAR_INBOUND_PORT,
    SIDECAR_OUTBOUND_PORT,
)
from cni.contract.kinds import Family, InterceptionMode, IPNetwork

PROBE_SNAT_V4 = ipaddress.IPv4Address(PROBE_SNAT_V4_TEXT)
PROBE_SNAT_V6 = ipaddress.IPv6Address(PROBE_SNAT_V6_TEXT)


@dataclass(frozen=True)
class SidecarSpec:
    """Sidecar (per-pod Envoy) interception, Istio-compatible."""

    proxy_uid: int = PROXY_UID
    proxy_gid: int = PROXY_GID
    outbound_port: int = SIDECAR_OUTBOUND_PORT
    inbound_port: int = SIDECAR_INBOUND_PORT
    # None = every inbound port except exclude_inbound_ports ("*"); a tuple = only these ports;
    # an empty tuple = no inbound capture at all.
    include_inbound_ports: tuple[int, ...] | None = None
    exclude_inbound_ports: tuple[int, ...] = SIDECAR_EXCLUDED_INBOUND
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_ranges: tuple[IPNetwork, ...] = ()
    # None = all destinations ("*"); a tuple = only these ranges; empty = no outbound capture.
    include_outbound_ranges: tuple[IPNetwork, ...] | None = None
    # Inbound capture: "REDIRECT" (nat REDIRECT to inbound_port: the proxy's accepted socket has local
    # address pod-ip:inbound_port, SO_ORIGINAL_DST gives the destination) or "TPROXY" (mangle TPROXY +
    # policy routing: the IP_TRANSPARENT listener's accepted socket has the original destination as its
    # local address). Outbound is REDIRECT to outbound_port either way.
    interception_mode: InterceptionMode = INTERCEPTION_REDIRECT
    # Outbound TCP to these ports is captured whatever the destination (after the excluded ports and
    # ranges, before the include ranges), as istio-iptables' includeOutboundPorts.
    include_outbound_ports: tuple[int, ...] = ()
    # Interfaces whose traffic is never captured: inbound arriving on them, outbound leaving via them.
    exclude_interfaces: tuple[str, ...] = ()
    # Interfaces of a VM (KubeVirt) routed through the pod: TCP arriving on them is the VM's outbound
    # traffic and goes to outbound_port (only to include_outbound_ranges when that is a list); the rest
    # of their traffic is not captured.
    kubevirt_interfaces: tuple[str, ...] = ()

    def ranges(self, family: Family, which: Literal["include", "exclude"]) -> tuple[IPNetwork, ...] | None:
        """The include/exclude outbound ranges of one address family (None = '*' for include)."""
        src = self.include_outbound_ranges if which == "include" else self.exclude_outbound_ranges
        if src is None:
            return None
        return tuple(n for n in src if n.version == family)


@dataclass(frozen=True)
class AmbientSpec:
    """Ambient (node proxy / ztunnel) in-pod interception."""

    outbound_port: int = AMBIENT_OUTBOUND_PORT
    inbound_port: int = AMBIENT_INBOUND_PORT
    hbone_port: int = AMBIENT_HBONE_PORT
    dns_port: int = AMBIENT_DNS_PORT
    capture_dns: bool = False
    mark: int = AMBIENT_MARK
    mark_mask: int = AMBIENT_MARK_MASK
    probe_snat_v4: ipaddress.IPv4Address = PROBE_SNAT_V4
    probe_snat_v6: ipaddress.IPv6Address = PROBE_SNAT_V6
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_ranges: tuple[IPNetwork, ...] = field(default=())
