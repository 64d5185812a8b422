"""The iptables redirection backend: cni.iptables (builder + atomic in-netns apply) behind RedirectBackend.

One flavour (legacy or nft) per node, chosen once by the agent (`cni.iptables.flavour.resolve`) and used
for every pod. Address families come from the pod's IPs (both when unknown: harmless in a v4-only pod).
"""

from __future__ import annotations

import ipaddress

from cni.iptables import flavour as flavour_mod
from cni.iptables import netns_tables
from cni.iptables.flavour import Flavour
from cni.redirect_spec import AmbientSpec, Family, SidecarSpec
from node_agent.backends.base import BackendError, PodTarget, RedirectSpec


def families_of(ips: tuple[str, ...]) -> tuple[Family, ...]:
    """The address families of a pod's IPs; (4, 6) when none are known. Bad IPs raise BackendError."""
    found: set[int] = set()
    for ip in ips:
        try:
            found.add(ipaddress.ip_interface(ip).version)
        except ValueError:
            raise BackendError(f"invalid pod IP {ip!r}") from None
    if not found:
        return (4, 6)
    out: list[Family] = []
    if 4 in found:
        out.append(4)
    if 6 in found:
        out.append(6)
    return tuple(out)


class IptablesBackend:
    """RedirectBackend on iptables chains (HEADRACE_*) inside each pod's netns."""

    name = "iptables"

    def __init__(self, flavour: str = "auto") -> None:
        try:
            self.flavour: Flavour = flavour_mod.resolve(flavour)
        except ValueError as exc:
            raise BackendError(str(exc)) from exc

    def apply(self, target: PodTarget, spec: RedirectSpec) -> None:
        families = families_of(target.ips)
        try:
            if isinstance(spec, SidecarSpec):
                netns_tables.apply_sidecar(target.netns_path, spec, families, self.flavour)
            elif isinstance(spec, AmbientSpec):
                netns_tables.apply_ambient(target.netns_path, spec, families, self.flavour)
            else:
                raise BackendError(f"unsupported redirect spec {type(spec).__name__}")
        except (netns_tables.IptablesError, ValueError, OSError) as exc:
            raise BackendError(f"iptables apply for pod {target.namespace}/{target.name}: {exc}") from exc

    def remove(self, target: PodTarget) -> None:
        try:
            netns_tables.remove_all(target.netns_path, self.flavour)
        except (netns_tables.IptablesError, OSError) as exc:
            raise BackendError(f"iptables remove for pod {target.namespace}/{target.name}: {exc}") from exc

    def check(self, target: PodTarget, spec: RedirectSpec) -> list[str]:
        families = families_of(target.ips)
        try:
            if isinstance(spec, SidecarSpec):
                return netns_tables.check_sidecar(target.netns_path, spec, families, self.flavour)
            if isinstance(spec, AmbientSpec):
                return netns_tables.check_ambient(target.netns_path, spec, families, self.flavour)
        except (netns_tables.IptablesError, ValueError, OSError) as exc:
            raise BackendError(f"iptables check for pod {target.namespace}/{target.name}: {exc}") from exc
        raise BackendError(f"unsupported redirect spec {type(spec).__name__}")

    def installed(self, target: PodTarget) -> bool:
        try:
            return netns_tables.installed(target.netns_path, self.flavour)
        except (netns_tables.IptablesError, OSError) as exc:
            raise BackendError(f"iptables read for pod {target.namespace}/{target.name}: {exc}") from exc
