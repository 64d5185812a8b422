"""The agent's node duties beyond enrolment: install-cni in the agent and the boot-race monitor.

    headrace agent ... [--install-cni [--cni-conf-dir D] [--cni-bin-dir D] [--cni-install-dir D]
                        [--cni-cleanup-on-exit]] [--repair-sidecars apply|flag|off]

`DutyOptions` is validated before anything starts (a bad value is a usage error naming the flag).
`AgentDuties` is created by the Agent after its reconciler; `start()` runs after the plugin-event socket
listens (so the entry is never chained before the agent can answer the plugin), `stop()` runs first on
shutdown (with cleanup the entry leaves before the socket closes). `status_view()` wraps the reconciler
for the plugin-event server (its Handler) so `headrace status` shows boot-race pods' state and reason.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cni.contract.kube_objects import Pod
from node_agent.agent.config import AgentConfig
from node_agent.agent.errors import AgentError
from node_agent.backends.base import PodRules
from node_agent.backends.iptables.backend import IptablesBackend
from node_agent.install_cni.duty import InstallCniDuty, InstallCniError
from node_agent.install_cni.service import InstallOptions
from node_agent.install_cni.settings import PluginSettings
from node_agent.reconcile.loop import Reconciler
from node_agent.reconcile.state import Outcome
from node_agent.repair.boot_race import REPAIR_MODES, BootRaceMonitor, PrometheusBootRaceMetrics, RepairMode
from node_agent.serve.cni_server import Handler
from node_agent.serve.metrics import AgentMetrics
from node_agent.sources.store import PodStore

_NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class DutyConfigError(ValueError):
    """A duty flag is invalid; the message names it."""


@dataclass(frozen=True)
class DutyOptions:
    install_cni: bool = False
    cni_conf_dir: str = "/etc/cni/net.d"
    cni_bin_dir: str = "/opt/cni/bin"
    cni_install_dir: str = "/opt/headrace"
    cni_cleanup_on_exit: bool = False
    repair_sidecars: RepairMode = "apply"
    boot_race_interval: float = 1.0
    boot_race_grace: float = 2.0
    agent_namespace: str = "headrace-system"


def build_duty_options(
    *,
    install_cni: bool = False,
    cni_conf_dir: str = "/etc/cni/net.d",
    cni_bin_dir: str = "/opt/cni/bin",
    cni_install_dir: str = "/opt/headrace",
    cni_cleanup_on_exit: bool = False,
    repair_sidecars: str = "apply",
    agent_namespace: str | None = None,
) -> DutyOptions:
    for flag, value in (("--cni-conf-dir", cni_conf_dir), ("--cni-bin-dir", cni_bin_dir),
                        ("--cni-install-dir", cni_install_dir)):
        if not value or not os.path.isabs(value):
            raise DutyConfigError(f"{flag} {value!r}: an absolute path is needed (it is written into the "
                                  "CNI config and the launcher)")
    if len({os.path.normpath(p) for p in (cni_conf_dir, cni_bin_dir, cni_install_dir)}) < 3:
        raise DutyConfigError("--cni-conf-dir, --cni-bin-dir and --cni-install-dir must be different directories")
    if cni_cleanup_on_exit and not install_cni:
        raise DutyConfigError("--cni-cleanup-on-exit needs --install-cni")
    if repair_sidecars not in REPAIR_MODES:
        raise DutyConfigError(f"--repair-sidecars {repair_sidecars!r}: expected one of {', '.join(REPAIR_MODES)}")
    ns = agent_namespace if agent_namespace is not None else os.environ.get("POD_NAMESPACE", "headrace-system")
    if not _NAMESPACE_RE.match(ns):
        raise DutyConfigError(f"agent namespace {ns!r} (POD_NAMESPACE) is not a valid namespace name")
    return DutyOptions(
        install_cni=install_cni, cni_conf_dir=os.path.normpath(cni_conf_dir),
        cni_bin_dir=os.path.normpath(cni_bin_dir), cni_install_dir=os.path.normpath(cni_install_dir),
        cni_cleanup_on_exit=cni_cleanup_on_exit, repair_sidecars=repair_sidecars,  # type: ignore[arg-type]
        agent_namespace=ns,
    )


def install_options(agent_config: AgentConfig, duties: DutyOptions) -> InstallOptions:
    """install-cni's options from the agent's settings: the entry points the plugin at this agent."""
    objects_dir = str(agent_config.objects_dir.resolve()) if agent_config.objects_dir is not None else None
    kubeconfig = str(agent_config.kubeconfig.resolve()) if agent_config.kubeconfig is not None else None
    settings = PluginSettings(
        agent_socket=str(agent_config.cni_socket), backend=agent_config.backend, iptables=agent_config.iptables,
        objects_dir=objects_dir, kubeconfig=kubeconfig, exclude_namespaces=tuple(agent_config.exclude_namespaces),
        agent_namespace=duties.agent_namespace, log_file=str(agent_config.state_dir / "cni.log"),
        log_level=agent_config.log_level,
    )
    return InstallOptions(
        cni_conf_dir=duties.cni_conf_dir, cni_bin_dir=duties.cni_bin_dir, install_dir=duties.cni_install_dir,
        host_root="/", install_plugin=True, settings=settings,
    )


class DutyHost(Protocol):
    """What the duties need of the agent (node_agent.agent.daemon.Agent)."""

    config: AgentConfig
    store: PodStore
    flavour: str
    reconciler: Reconciler
    metrics: AgentMetrics


class AgentDuties:
    """install-cni + boot-race monitor around one agent."""

    def __init__(self, agent: DutyHost, options: DutyOptions | None, *,
                 monitor: BootRaceMonitor | None = None) -> None:
        self.options = options or DutyOptions(repair_sidecars="off")
        self.agent = agent
        self.install: InstallCniDuty | None = None
        if self.options.install_cni:
            self.install = InstallCniDuty(install_options(agent.config, self.options),
                                          cleanup_on_exit=self.options.cni_cleanup_on_exit)
        self.monitor = monitor
        if self.monitor is None and self.options.repair_sidecars != "off":
            self.monitor = self._make_monitor()

    def _make_monitor(self) -> BootRaceMonitor:
        """Checks with the node's backend, its fallback and the iptables backend the plugin writes sidecar
        rules with (unless its conflist says backend ebpf); repairs through the reconciler."""
        agent = self.agent
        reconciler = agent.reconciler
        checks: list[PodRules] = list(reconciler.backends.in_use())
        if not any(b.name == "iptables" for b in checks):
            checks.append(IptablesBackend(agent.flavour))
        return BootRaceMonitor(
            agent.store, mode=self.options.repair_sidecars, check_backends=checks, repairer=reconciler,
            exclude_namespaces=tuple(agent.config.exclude_namespaces),
            metrics=PrometheusBootRaceMetrics(agent.metrics.registry),
            interval=self.options.boot_race_interval, grace=self.options.boot_race_grace,
        )

    def start(self) -> None:
        if self.install is not None:
            try:
                self.install.start()
            except InstallCniError as exc:
                raise AgentError(str(exc)) from exc
        if self.monitor is not None:
            self.monitor.start()

    def stop(self, leaving: bool = False) -> None:
        """`leaving`: the agent's DaemonSet goes away, so install-cni's entry and files go too (as with
        --cni-cleanup-on-exit)."""
        if self.monitor is not None:
            self.monitor.stop()
        if self.install is not None:
            self.install.stop(cleanup=leaving)

    def status_view(self, handler: Handler) -> StatusView:
        return StatusView(handler, self.overlay)

    def overlay(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.monitor.overlay(rows) if self.monitor is not None else rows


class StatusView:
    """The reconciler as the plugin-event server sees it (its Handler), with boot-race verdicts in the
    status rows."""

    def __init__(self, handler: Handler, overlay: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
        self._handler = handler
        self._overlay = overlay

    def cni_add(self, uid: str, namespace: str, name: str, netns: str, ips: tuple[str, ...],
                timeout: float) -> Outcome:
        return self._handler.cni_add(uid, namespace, name, netns, ips, timeout)

    def cni_sidecar_add(self, uid: str, namespace: str, name: str, netns: str, ips: tuple[str, ...],
                        timeout: float, pod: Pod | None = None) -> Outcome:
        return self._handler.cni_sidecar_add(uid, namespace, name, netns, ips, timeout, pod)

    def cni_del(self, uid: str, plugin_removes: tuple[str, str] | None = None) -> Outcome:
        return self._handler.cni_del(uid, plugin_removes)

    def cni_check(self, uid: str) -> Outcome:
        return self._handler.cni_check(uid)

    def status(self) -> list[dict[str, Any]]:
        return self._overlay(self._handler.status())
