"""install-cni run by the agent (`headrace agent --install-cni`): install once at start, then keep our entry
in the node's primary CNI config from a thread of the agent, and on shutdown (only with
`--cni-cleanup-on-exit`) remove exactly what this agent added.

The work itself is `node_agent.install_cni.service` (`install_once`, `watch`): this module only runs it in
a thread and keeps track of what it changed:

- **The config files.** Before the first insert the primary config's bytes are remembered. On cleanup
  our entry is taken out (`confdir.uninstall_config`, which also turns a converted `.conf` back); when
  the result is the same JSON value as what we found, the remembered bytes are written back, so the
  file is byte-identical to before (the uninstall alone would leave it re-rendered). A primary config
  that only appeared after the agent started gets the uninstall's rendering (same JSON value).
- **The plugin files** (launcher + runtime) are removed only when this agent installed or changed them
  (at start, or when its watch put back missing ones); a launcher that was already current (the
  DaemonSet's init container put it there) stays.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from node_agent.install_cni import confdir, hostpath, service
from node_agent.install_cni.atomic import write_atomic
from node_agent.install_cni.conflist import ConfigError
from node_agent.install_cni.runtime import PluginInstall, RuntimeInstallError, uninstall_plugin

log = logging.getLogger("headrace.agent.install-cni")


class InstallCniError(RuntimeError):
    """install-cni cannot run at all (the plugin files cannot be installed)."""


@dataclass
class _Pristine:
    """A config file as we first found it (before our entry went in)."""

    path: str
    raw: bytes
    doc: Any
    mode: int


@dataclass
class InstallCniDuty:
    options: service.InstallOptions
    cleanup_on_exit: bool = False
    recheck: float = service.RECHECK_INTERVAL
    plugin_recheck: float = service.PLUGIN_RECHECK_INTERVAL
    use_inotify: bool = True
    on_change: Callable[[Any], None] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _pristine: dict[str, _Pristine] = field(default_factory=dict)
    _plugin_installed_here: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    changes: int = 0

    # ---- what we found -----------------------------------------------------------------------------
    def _remember_primary(self) -> None:
        """Keep the primary config's bytes the first time we see it without our entry."""
        try:
            primary = confdir.find_primary(self.options.conf_dir_here, self.options.host_root)
        except ConfigError:
            return
        if primary is None:
            return
        real = primary.real
        with self._lock:
            if real in self._pristine:
                return
            try:
                with open(real, "rb") as fh:
                    raw = fh.read()
            except OSError:
                return
            try:
                doc = json.loads(raw)
            except ValueError:
                return
            plugins = doc.get("plugins") if isinstance(doc, dict) else None
            if isinstance(plugins, list) and any(isinstance(p, dict) and p.get("type") == "headrace-cni"
                                                 for p in plugins):
                return  # already has an entry (a previous agent's): not pristine
            self._pristine[real] = _Pristine(real, raw, doc, primary.mode)

    # ---- life cycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Install once (plugin files + entry), then watch in a thread. Plugin files that cannot be
        installed stop the agent (InstallCniError); an unusable config is logged and retried."""
        service.remove_stale_temps(self.options)
        try:
            result = service.install_plugin_files(self.options)
        except (RuntimeInstallError, OSError) as exc:
            raise InstallCniError(f"installing the headrace-cni plugin failed: {exc}") from exc
        self._plugin_installed_here = bool(result is not None and result.changed)
        self._remember_primary()
        try:
            change = service.ensure_config(self.options)
            log.info("install-cni: %s", change.action, extra={"step": "install-cni", **change.as_dict()})
        except (ConfigError, OSError) as exc:
            log.error("install-cni: cannot use the primary CNI config: %s", exc, extra={"step": "install-cni"})
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="install-cni", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        def changed(change: Any) -> None:
            self.changes += 1
            if self.on_change is not None:
                self.on_change(change)

        def installed(result: PluginInstall) -> None:  # the watch put back missing plugin files
            if result.changed:
                self._plugin_installed_here = True

        try:
            service.watch(self.options, self._stop, on_change=changed, recheck=self.recheck,
                          use_inotify=self.use_inotify, plugin_recheck=self.plugin_recheck,
                          on_plugin_install=installed)
        except Exception:
            log.exception("install-cni watch stopped", extra={"step": "install-cni"})

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0, cleanup: bool = False) -> dict[str, Any] | None:
        """Stop watching; with cleanup_on_exit (or `cleanup`: the agent's DaemonSet goes away) remove what
        this agent added. Returns the cleanup report."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if not (self.cleanup_on_exit or cleanup):
            return None
        return self.cleanup()

    def cleanup(self) -> dict[str, Any]:
        opts = self.options
        changes = confdir.uninstall_config(opts.conf_dir_here, opts.state_path_here, opts.host_root)
        restored: list[str] = []
        for ch in changes:
            path = ch.path
            if path is None:
                continue
            try:
                real = hostpath.resolve(path, opts.host_root)
            except hostpath.LinkError:
                continue
            with self._lock:
                pristine = self._pristine.get(real)
            if pristine is None or not os.path.exists(real):
                continue
            try:
                with open(real, "rb") as fh:
                    now = json.loads(fh.read())
            except (OSError, ValueError):
                continue
            if now == pristine.doc:
                write_atomic(real, pristine.raw, mode=pristine.mode)
                restored.append(path)
        removed: list[str] = []
        if self._plugin_installed_here and opts.install_plugin:
            removed = uninstall_plugin(opts.cni_bin_dir, opts.install_dir, opts.host_root)
        report = {"config": [c.as_dict() for c in changes], "bytes_restored": restored, "removed": removed}
        log.info("install-cni: removed what the agent added", extra={"step": "install-cni-cleanup", **report})
        return report

