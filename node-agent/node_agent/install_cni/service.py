"""install-cni as a service: install once, then keep our entry in the primary config (watch + repair).

Used by `headrace install-cni [--watch]` and importable by the agent (`InstallOptions`, `install_once`,
`watch`, `uninstall`).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from node_agent.install_cni import atomic, confdir, kubeconfig, owner
from node_agent.install_cni.conflist import ConfigError
from node_agent.install_cni.repair_throttle import RepairThrottle
from node_agent.install_cni.runtime import (
    PLUGIN_BINARY,
    PluginInstall,
    RuntimeInstallError,
    install_plugin,
    is_our_launcher,
    launcher_problem,
    under_root,
    uninstall_plugin,
)
from node_agent.install_cni.settings import PluginSettings
from node_agent.install_cni.watcher import DirWatcher

STATE_FILE = "install-state.json"
#: Re-check this often even without an inotify event (covers missed events and lost watches).
RECHECK_INTERVAL = 1.0
#: Check this often that the launcher and what its `#!` line runs are still there.
PLUGIN_RECHECK_INTERVAL = 5.0


@dataclass(frozen=True)
class InstallOptions:
    """Paths are as the host sees them; `host_root` is where the host's / is mounted here."""

    cni_conf_dir: str = "/etc/cni/net.d"
    cni_bin_dir: str = "/opt/cni/bin"
    install_dir: str = "/opt/headrace"
    host_root: str = "/"
    install_plugin: bool = True
    settings: PluginSettings = field(default_factory=PluginSettings)
    #: When set, write `<install_dir>/kubeconfig` from this service account dir (settings.kubeconfig
    #: should then name that host path: see `kubeconfig_path`).
    service_account_dir: str | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    #: Insert the entry only once the agent's socket exists (the plugin would fail ambient ADDs before).
    wait_for_agent: bool = False

    @property
    def kubeconfig_path(self) -> str:
        return os.path.join(self.install_dir, kubeconfig.FILE_NAME)

    @property
    def conf_dir_here(self) -> str:
        return under_root(self.host_root, self.cni_conf_dir)

    @property
    def state_path_here(self) -> str:
        return os.path.join(under_root(self.host_root, self.install_dir), STATE_FILE)


def log(level: str, msg: str, **fields: Any) -> None:
    """One JSON object a line on stderr (structured logs)."""
    rec = {"ts": round(time.time(), 3), "level": level, "component": "install-cni", "msg": msg, **fields}
    print(json.dumps(rec, default=str), file=sys.stderr, flush=True)


def install_plugin_files(opts: InstallOptions) -> PluginInstall | None:
    if not opts.install_plugin:
        return None
    result = install_plugin(opts.cni_bin_dir, opts.install_dir, opts.host_root,
                            agent_socket=opts.settings.agent_socket)
    log("info", "plugin installed" if result.changed else "plugin already current",
        launcher=result.launcher, runtime=result.runtime,
        front=result.front or "none in this build: the interpreter relays the ADD")
    return result


def plugin_problem(cni_bin_dir: str, host_root: str) -> str:
    """What keeps the runtime from running headrace-cni ("" when nothing): no launcher of ours in the CNI
    binary dir (a host path), or what its `#!` line runs missing."""
    launcher = under_root(host_root, os.path.join(cni_bin_dir, PLUGIN_BINARY))
    if not is_our_launcher(launcher):
        return f"no headrace-cni launcher in {cni_bin_dir}"
    return launcher_problem(launcher, host_root)


@dataclass
class PluginGuard:
    """Keeps the plugin runnable while the watch keeps our entry in the chain: every `interval` seconds it
    checks the launcher and what it runs. When this install-cni installs the plugin it installs it again;
    with --skip-plugin (the DaemonSet's install-plugin init container installs it) it logs an error once:
    every pod ADD through our entry fails until then, and `--check` says not ready."""

    opts: InstallOptions
    interval: float = PLUGIN_RECHECK_INTERVAL
    on_install: Callable[[PluginInstall], None] | None = None
    _due: float = 0.0
    _reported: str = ""

    def poll(self, now: float) -> None:
        if now < self._due:
            return
        self._due = now + self.interval
        try:
            problem = plugin_problem(self.opts.cni_bin_dir, self.opts.host_root)
        except OSError as exc:
            problem = f"cannot read the launcher: {exc}"
        if not problem:
            if self._reported:
                log("info", "headrace-cni launcher usable again", launcher=self._launcher)
                self._reported = ""
        elif self.opts.install_plugin:
            self._install(problem)
        else:
            self._report(problem, "headrace-cni launcher cannot run: every pod ADD through our entry fails until "
                         "it is installed again (restarting this pod runs the install-plugin init container)")

    @property
    def _launcher(self) -> str:
        return os.path.join(self.opts.cni_bin_dir, PLUGIN_BINARY)

    def _install(self, problem: str) -> None:
        if not self._reported:  # not again on each retry after a failed install
            log("warning", "headrace-cni launcher cannot run: installing the plugin again",
                launcher=self._launcher, problem=problem)
        try:
            result = install_plugin_files(self.opts)
        except (RuntimeInstallError, OSError, ValueError) as exc:
            self._report(str(exc), "installing the plugin again failed: every pod ADD through our entry fails")
            return
        self._reported = ""
        if result is not None and self.on_install is not None:
            self.on_install(result)

    def _report(self, problem: str, msg: str) -> None:
        if problem != self._reported:
            log("error", msg, launcher=self._launcher, problem=problem)
            self._reported = problem


def write_kubeconfig(opts: InstallOptions) -> None:
    """Write/refresh the plugin's kubeconfig when asked to (no-op otherwise)."""
    if opts.service_account_dir:
        here = under_root(opts.host_root, opts.kubeconfig_path)
        if kubeconfig.write_from_service_account(here, opts.service_account_dir, opts.environ):
            log("info", "kubeconfig for the plugin written", path=opts.kubeconfig_path)


def ensure_config(opts: InstallOptions) -> confdir.ConfigChange:
    """Insert or repair our entry in the primary config (raises ConfigError on an unusable file)."""
    write_kubeconfig(opts)
    from cni.plugin.netconf import SUPPORTED_VERSIONS

    change = confdir.install_config(
        opts.conf_dir_here, opts.settings.entry(), opts.state_path_here, supported_versions=SUPPORTED_VERSIONS,
        host_root=opts.host_root,
    )
    if change.changed:
        log("info", f"conflist {change.action}", **change.as_dict())
        if change.skipped:
            log("warning", "CNI configs before the one chained into are skipped: the runtime does not load them",
                skipped=list(change.skipped))
    return change


def remove_stale_temps(opts: InstallOptions) -> None:
    """The temporary files an install-cni killed mid-write left in the directories it writes to (the CNI
    config and binary dirs, the install dir): removed once at start."""
    dirs = (opts.conf_dir_here, under_root(opts.host_root, opts.cni_bin_dir),
            under_root(opts.host_root, opts.install_dir))
    for directory in dirs:
        for name in atomic.remove_stale_temps(directory):
            log("info", "unfinished write of a previous install-cni removed", path=os.path.join(directory, name))


def install_once(opts: InstallOptions) -> confdir.ConfigChange:
    remove_stale_temps(opts)
    install_plugin_files(opts)
    return ensure_config(opts)


def watch(
    opts: InstallOptions,
    stop: threading.Event,
    on_change: Callable[[confdir.ConfigChange], None] | None = None,
    recheck: float = RECHECK_INTERVAL,
    use_inotify: bool = True,
    plugin_recheck: float = PLUGIN_RECHECK_INTERVAL,
    on_plugin_install: Callable[[PluginInstall], None] | None = None,
) -> None:
    """Keep our entry in place until `stop` is set: re-inserted within a second of being dropped,
    installed as soon as a primary config appears. Errors on a broken file are logged (once per
    distinct message) and retried on the next change. Every `plugin_recheck` seconds the launcher is
    checked too (`PluginGuard`)."""
    last_error = ""
    waiting_logged = False
    if opts.wait_for_agent:
        sock = under_root(opts.host_root, opts.settings.agent_socket)
        if not os.path.exists(sock):
            log("info", "waiting for the agent socket before chaining the plugin", socket=opts.settings.agent_socket)
        while not os.path.exists(sock) and not stop.wait(0.2):
            pass
    throttle = RepairThrottle()
    guard = PluginGuard(opts, plugin_recheck, on_plugin_install)
    with DirWatcher(opts.conf_dir_here, use_inotify=use_inotify) as watcher:
        while not stop.is_set():
            if stop.wait(throttle.delay(time.monotonic())):
                break
            guard.poll(time.monotonic())
            try:
                change = ensure_config(opts)
                last_error = ""
                if change.changed:
                    _note_write(throttle, change)
                if change.action == "no-config":
                    if not waiting_logged:
                        log("info", "no CNI config yet; waiting for one", dir=opts.cni_conf_dir,
                            skipped=list(change.skipped))
                        waiting_logged = True
                else:
                    waiting_logged = False
                if on_change is not None and change.changed:
                    on_change(change)
            except ConfigError as exc:
                if str(exc) != last_error:
                    log("error", "cannot use the primary CNI config", file=exc.filename, error=exc.message)
                    last_error = str(exc)
            except kubeconfig.KubeconfigError as exc:
                if str(exc) != last_error:
                    log("error", "cannot write the plugin's kubeconfig", error=str(exc))
                    last_error = str(exc)
            except OSError as exc:
                if str(exc) != last_error:
                    log("error", "config dir I/O error", dir=opts.cni_conf_dir, error=str(exc))
                    last_error = str(exc)
            watcher.wait(recheck)


def _note_write(throttle: RepairThrottle, change: confdir.ConfigChange) -> None:
    now = time.monotonic()
    throttle.wrote(now)
    if writes := throttle.fighting(now):
        log("warning", "another writer keeps dropping our entry from the CNI config: rewriting it at most twice "
            "a second; a primary CNI that owns its config exclusively must be set to allow chained plugins "
            "(e.g. Cilium's cni.exclusive=false)", file=change.path, writes=writes, seconds=throttle.window)


def uninstall(opts: InstallOptions) -> dict[str, Any]:
    """Remove exactly what install added: our entry (restoring a converted .conf), the launcher,
    the runtime and the state file."""
    changes = confdir.uninstall_config(opts.conf_dir_here, opts.state_path_here, opts.host_root)
    removed = uninstall_plugin(opts.cni_bin_dir, opts.install_dir, opts.host_root)
    install_here = under_root(opts.host_root, opts.install_dir)
    kube_here = os.path.join(install_here, kubeconfig.FILE_NAME)
    if os.path.exists(kube_here):
        os.unlink(kube_here)
        removed.append(opts.kubeconfig_path)
    try:
        if os.path.isdir(install_here) and not os.listdir(install_here):
            os.rmdir(install_here)
    except OSError:
        pass
    report = {"config": [c.as_dict() for c in changes], "removed": removed}
    log("info", "uninstalled", **report)
    return report


def owner_check(opts: InstallOptions, daemonset: str) -> owner.OwnerCheck:
    """The DaemonSet question (see `owner`), asked with the plugin's kubeconfig; `start()` it before the
    watch."""
    kubeconfig = opts.settings.kubeconfig

    def check() -> owner.Verdict:
        if not kubeconfig:
            return owner.Verdict(owner.UNKNOWN, "no kubeconfig to ask the Kubernetes API with")
        here = under_root(opts.host_root, kubeconfig)
        return owner.check_daemonset(here, opts.settings.agent_namespace, daemonset)

    def unseen(verdict: owner.Verdict) -> None:
        log("warning", "DaemonSet never seen since the start: at termination only a deletionTimestamp will be "
            "taken for an uninstall", daemonset=f"{opts.settings.agent_namespace}/{daemonset}",
            reason=verdict.reason)

    return owner.OwnerCheck(check, unseen=unseen)


def uninstall_if_owner_gone(opts: InstallOptions, daemonset: str, checker: owner.OwnerCheck) -> owner.Verdict:
    """At termination: uninstall when our DaemonSet is gone or being deleted, keep everything on a
    rolling update or restart (see `owner`). An unknown answer is retried a few times within the grace
    period, then the files stay (logged with the manual fix)."""
    verdict = checker.final()
    fields = {"daemonset": f"{opts.settings.agent_namespace}/{daemonset}", "reason": verdict.reason}
    if verdict.uninstall:
        log("info", "DaemonSet going away: removing the plugin from this node", **fields)
        uninstall(opts)
    elif verdict.action == owner.KEEP:
        log("info", "DaemonSet still present: keeping the plugin chained for the next pod", **fields)
    else:
        log("warning", "cannot tell whether the DaemonSet is being deleted: keeping the plugin; if it was "
            "deleted, run `headrace uninstall-cni` on this node", **fields)
    return verdict
