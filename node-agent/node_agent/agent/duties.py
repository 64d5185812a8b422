"""The agent's node duties beyond enrolment (issue 5): install-cni in the agent and the boot-race monitor.

    headrace agent ... [--install-cni [--cni-conf-dir D] [--cni-bin-dir D] [--cni-install-dir D]
                        [--cni-cleanup-on-exit]] [--repair-sidecars apply|flag|off]

`DutyOptions` is validated before anything starts (a bad value is a usage error naming the flag).
`AgentDuties` is created by the Agent after its reconciler; `start()` runs after the plugin-event socket
listens (so the entry is never chained before the agent can answer the plugin), `stop()` runs first on
shutdown (with cleanup the entry leaves before the socket closes). `status_view()` wraps the reconciler
for the plugin-event server so `headrace status` shows boot-race pods' state and reason.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from node_agent.backends.base import RedirectBackend, needs_cgroup
from node_agent.netns.finder import NetnsLocation
from node_agent.reconcile.loop import Outcome
from node_agent.repair.boot_race import REPAIR_MODES, BootRaceMonitor, PrometheusBootRaceMetrics, RepairMode

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


def install_options(agent_config: Any, duties: DutyOptions) -> Any:
    """install-cni's options from the agent's settings: the entry points the plugin at this agent."""
    from node_agent.install_cni import service
    from node_agent.install_cni.settings import PluginSettings

    objects_dir = str(agent_config.objects_dir.resolve()) if agent_config.objects_dir is not None else None
    kubeconfig = str(agent_config.kubeconfig.resolve()) if agent_config.kubeconfig is not None else None
    settings = PluginSettings(
        agent_socket=str(agent_config.cni_socket), backend=agent_config.backend, iptables=agent_config.iptables,
        objects_dir=objects_dir, kubeconfig=kubeconfig, exclude_namespaces=tuple(agent_config.exclude_namespaces),
        agent_namespace=duties.agent_namespace, log_file=str(agent_config.state_dir / "cni.log"),
        log_level=agent_config.log_level,
    )
    return service.InstallOptions(
        cni_conf_dir=duties.cni_conf_dir, cni_bin_dir=duties.cni_bin_dir, install_dir=duties.cni_install_dir,
        host_root="/", install_plugin=True, settings=settings,
    )


class AgentDuties:
    """install-cni + boot-race monitor around one Agent (anything with config, store, backend, flavour,
    reconciler and metrics)."""

    def __init__(self, agent: Any, options: DutyOptions | None, *, monitor: BootRaceMonitor | None = None) -> None:
        self.options = options or DutyOptions(repair_sidecars="off")
        self.agent = agent
        self.install: Any = None
        if self.options.install_cni:
            from node_agent.install_cni.duty import InstallCniDuty

            self.install = InstallCniDuty(install_options(agent.config, self.options),
                                          cleanup_on_exit=self.options.cni_cleanup_on_exit)
        self.monitor = monitor
        if self.monitor is None and self.options.repair_sidecars != "off":
            self.monitor = self._make_monitor()

    def _make_monitor(self) -> BootRaceMonitor:
        agent = self.agent
        fallback: RedirectBackend | None = getattr(agent.reconciler, "fallback", None)
        checks: list[RedirectBackend] = [b for b in (agent.backend, fallback) if b is not None]
        iptables: RedirectBackend | None = next((b for b in checks if b.name == "iptables"), None)
        if iptables is None:
            # the plugin writes sidecar rules with iptables unless its conflist says backend ebpf
            from node_agent.backends.iptables.backend import IptablesBackend

            iptables = IptablesBackend(agent.flavour)
            checks.append(iptables)

        def repair_backend(loc: NetnsLocation) -> RedirectBackend:
            node: RedirectBackend = agent.backend
            if needs_cgroup(node) and not loc.cgroup_path:
                return fallback if fallback is not None else iptables
            return node

        registry = getattr(agent.metrics, "registry", None)
        return BootRaceMonitor(
            agent.store, mode=self.options.repair_sidecars, check_backends=checks,
            repair_backend=repair_backend, exclude_namespaces=tuple(agent.config.exclude_namespaces),
            skip=lambda: list(getattr(agent.reconciler, "sidecars", {}).copy()),
            metrics=PrometheusBootRaceMetrics(registry) if registry is not None else None,
            interval=self.options.boot_race_interval, grace=self.options.boot_race_grace,
        )

    def start(self) -> None:
        if self.install is not None:
            from node_agent.install_cni.duty import InstallCniError

            try:
                self.install.start()
            except InstallCniError as exc:
                from node_agent.agent.daemon import AgentError

                raise AgentError(str(exc)) from exc
        if self.monitor is not None:
            self.monitor.start()

    def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
        if self.install is not None:
            self.install.stop()

    def status_view(self, handler: Any) -> StatusView:
        return StatusView(handler, self)

    def overlay(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.monitor.overlay(rows) if self.monitor is not None else rows


class StatusView:
    """The reconciler as the plugin-event server sees it, with boot-race verdicts in the status rows."""

    def __init__(self, handler: Any, duties: AgentDuties) -> None:
        self._handler = handler
        self._duties = duties

    def cni_add(self, uid: str, namespace: str, name: str, netns: str, ips: tuple[str, ...],
                timeout: float) -> Outcome:
        out: Outcome = self._handler.cni_add(uid, namespace, name, netns, ips, timeout)
        return out

    def cni_sidecar_add(self, uid: str, namespace: str, name: str, netns: str, ips: tuple[str, ...],
                        timeout: float) -> Outcome:
        out: Outcome = self._handler.cni_sidecar_add(uid, namespace, name, netns, ips, timeout)
        return out

    def cni_del(self, uid: str) -> Outcome:
        out: Outcome = self._handler.cni_del(uid)
        return out

    def cni_check(self, uid: str) -> Outcome:
        out: Outcome = self._handler.cni_check(uid)
        return out

    def status(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._handler.status()
        return self._duties.overlay(rows)

    def __getattr__(self, name: str) -> Any:  # anything else the server may ask the reconciler for
        return getattr(self._handler, name)
