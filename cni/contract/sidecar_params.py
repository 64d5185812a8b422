"""The sidecar redirect's values in a light form for the CNI plugin's hot path.

``cni.contract.spec.SidecarSpec`` is a frozen dataclass (the agent and the eBPF backend rely on
``dataclasses.fields``/``replace``), and importing ``dataclasses`` + ``typing`` + ``ipaddress`` costs the
plugin about 20 ms per sidecar ADD. ``SidecarParams`` holds exactly the same fields with the same
defaults and the same ``ranges()``; the rule builder reads either. ``annotations.sidecar_spec`` turns
these into the dataclass for everyone else. Both take their defaults from cni/contract/constants.py.
"""

from __future__ import annotations

from cni.contract.constants import (
    INTERCEPTION_REDIRECT,
    PROXY_GID,
    PROXY_UID,
    SIDECAR_EXCLUDED_INBOUND,
    SIDECAR_INBOUND_PORT,
    SIDECAR_OUTBOUND_PORT,
)
from cni.contract.record import Record

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from typing import Literal

    from cni.contract.kinds import Family, InterceptionMode, IPNetwork

FIELDS = (
    "proxy_uid",
    "proxy_gid",
    "outbound_port",
    "inbound_port",
    "include_inbound_ports",
    "exclude_inbound_ports",
    "exclude_outbound_ports",
    "exclude_outbound_ranges",
    "include_outbound_ranges",
    "interception_mode",
    "include_outbound_ports",
    "exclude_interfaces",
    "kubevirt_interfaces",
)


class SidecarParams(Record):
    """The fields of ``SidecarSpec``, same meaning and defaults (see there)."""

    __slots__ = FIELDS
    proxy_uid: int
    proxy_gid: int
    outbound_port: int
    inbound_port: int
    include_inbound_ports: tuple[int, ...] | None
    exclude_inbound_ports: tuple[int, ...]
    exclude_outbound_ports: tuple[int, ...]
    exclude_outbound_ranges: tuple[IPNetwork, ...]
    include_outbound_ranges: tuple[IPNetwork, ...] | None
    interception_mode: InterceptionMode
    include_outbound_ports: tuple[int, ...]
    exclude_interfaces: tuple[str, ...]
    kubevirt_interfaces: tuple[str, ...]

    def __init__(
        self,
        proxy_uid: int = PROXY_UID,
        proxy_gid: int = PROXY_GID,
        outbound_port: int = SIDECAR_OUTBOUND_PORT,
        inbound_port: int = SIDECAR_INBOUND_PORT,
        include_inbound_ports: tuple[int, ...] | None = None,
        exclude_inbound_ports: tuple[int, ...] = SIDECAR_EXCLUDED_INBOUND,
        exclude_outbound_ports: tuple[int, ...] = (),
        exclude_outbound_ranges: tuple[IPNetwork, ...] = (),
        include_outbound_ranges: tuple[IPNetwork, ...] | None = None,
        interception_mode: InterceptionMode = INTERCEPTION_REDIRECT,
        include_outbound_ports: tuple[int, ...] = (),
        exclude_interfaces: tuple[str, ...] = (),
        kubevirt_interfaces: tuple[str, ...] = (),
    ) -> None:
        self._init(
            proxy_uid=proxy_uid,
            proxy_gid=proxy_gid,
            outbound_port=outbound_port,
            inbound_port=inbound_port,
            include_inbound_ports=include_inbound_ports,
            exclude_inbound_ports=exclude_inbound_ports,
            exclude_outbound_ports=exclude_outbound_ports,
            exclude_outbound_ranges=exclude_outbound_ranges,
            include_outbound_ranges=include_outbound_ranges,
            interception_mode=interception_mode,
            include_outbound_ports=include_outbound_ports,
            exclude_interfaces=exclude_interfaces,
            kubevirt_interfaces=kubevirt_interfaces,
        )

    def ranges(self, family: Family, which: Literal["include", "exclude"]) -> tuple[IPNetwork, ...] | None:
        """The include/exclude outbound ranges of one address family (None = '*' for include)."""
        src = self.include_outbound_ranges if which == "include" else self.exclude_outbound_ranges
        if src is None:
            return None
        return tuple(n for n in src if n.version == family)

    def __repr__(self) -> str:  # the text SidecarSpec's repr gives (it appears in the plugin's log)
        return "SidecarSpec(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in FIELDS) + ")"
