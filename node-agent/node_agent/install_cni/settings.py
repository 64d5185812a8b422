"""The settings install-cni writes into our conflist entry (the plugin reads them from its stdin)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from cni.plugin.launch import DEFAULT_AGENT_SOCKET
from node_agent.install_cni.conflist import PLUGIN_TYPE

DEFAULT_LOG_FILE = "/var/run/headrace/cni.log"
DEFAULT_AGENT_NAMESPACE = "headrace-system"
DEFAULT_EXCLUDE_NAMESPACES = ("kube-system",)
BACKENDS = ("auto", "iptables", "nftables", "ebpf")
IPTABLES_MODES = ("auto", "legacy", "nft")
LOG_LEVELS = ("debug", "info", "warning", "error")

_NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class PluginSettings:
    """What goes into `{"type": "headrace-cni", ...}`. Paths are as the plugin sees them on the host."""

    agent_socket: str = DEFAULT_AGENT_SOCKET
    backend: str = "auto"
    iptables: str = "auto"
    objects_dir: str | None = None
    kubeconfig: str | None = None
    exclude_namespaces: tuple[str, ...] = DEFAULT_EXCLUDE_NAMESPACES
    agent_namespace: str = DEFAULT_AGENT_NAMESPACE
    log_file: str = DEFAULT_LOG_FILE
    log_level: str = "info"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise SettingsError(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.iptables not in IPTABLES_MODES:
            raise SettingsError(f"iptables must be one of {', '.join(IPTABLES_MODES)}, not {self.iptables!r}")
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(f"log_level must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}")
        if self.objects_dir and self.kubeconfig:
            raise SettingsError("give objects_dir or kubeconfig, not both")
        paths = {
            "agent_socket": self.agent_socket,
            "log_file": self.log_file,
            "objects_dir": self.objects_dir,
            "kubeconfig": self.kubeconfig,
        }
        for path_name, value in paths.items():
            if value is not None and not value.startswith("/"):
                raise SettingsError(f"{path_name} must be an absolute path, not {value!r}")
        for ns in (*self.exclude_namespaces, self.agent_namespace):
            if not _NAMESPACE_RE.match(ns):
                raise SettingsError(f"not a valid namespace name: {ns!r}")

    def excluded(self) -> list[str]:
        """Excluded namespaces, always including the agent's own (never-block rule), order kept."""
        out: list[str] = []
        for ns in (*self.exclude_namespaces, self.agent_namespace):
            if ns not in out:
                out.append(ns)
        return out

    def entry(self) -> dict[str, Any]:
        """Our conflist entry (key order stable so rendering is deterministic)."""
        e: dict[str, Any] = {"type": PLUGIN_TYPE}
        if self.kubeconfig:
            e["kubeconfig"] = self.kubeconfig
        if self.objects_dir:
            e["objects_dir"] = self.objects_dir
        e["agent_socket"] = self.agent_socket
        e["backend"] = self.backend
        e["iptables"] = self.iptables
        e["exclude_namespaces"] = self.excluded()
        e["log_file"] = self.log_file
        e["log_level"] = self.log_level
        for k, v in self.extra.items():
            e.setdefault(k, v)
        return e
