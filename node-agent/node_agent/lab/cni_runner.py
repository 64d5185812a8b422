"""Execute a CNI conflist the way a container runtime does (libcni semantics), for tests and benches.

ADD runs the plugins in order, each getting the previous plugin's result as `prevResult`; the final result
is cached per (network, container, ifname), as libcni does. DEL runs them in reverse order with the cached
result as prevResult; CHECK runs them in order with it. Plugins run inside `run_netns` (the simulated
node), never in the machine's root netns.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class CniInvocationError(Exception):
    """A plugin exited non-zero; `error` is its decoded CNI error object (or None)."""

    def __init__(self, plugin: str, command: str, returncode: int, stdout: str, stderr: str) -> None:
        self.plugin = plugin
        self.command = command
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        try:
            decoded = json.loads(stdout) if stdout.strip() else None
        except json.JSONDecodeError:
            decoded = None
        self.error: dict[str, Any] | None = decoded if isinstance(decoded, dict) else None
        super().__init__(f"{plugin} {command} exited {returncode}: {stdout.strip()} {stderr.strip()}")

    @property
    def code(self) -> int | None:
        return None if self.error is None else self.error.get("code")

    @property
    def msg(self) -> str:
        return "" if self.error is None else str(self.error.get("msg", ""))


@dataclass
class PluginRun:
    plugin: str
    command: str
    seconds: float
    result: dict[str, Any] | None


@dataclass
class CniRunner:
    conflist: dict[str, Any]
    cni_path: list[str]
    cache_dir: Path
    run_netns: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    timings: list[PluginRun] = field(default_factory=list)

    # -- plumbing ------------------------------------------------------------------------------------
    def _binary(self, plugin_type: str) -> str:
        for d in self.cni_path:
            candidate = os.path.join(d, plugin_type)
            if os.access(candidate, os.X_OK):
                return candidate
        raise FileNotFoundError(f"CNI plugin {plugin_type!r} not in {self.cni_path}")

    def _netconf(self, plugin: dict[str, Any], prev: dict[str, Any] | None) -> dict[str, Any]:
        conf = dict(plugin)
        conf["name"] = self.conflist["name"]
        conf["cniVersion"] = self.conflist["cniVersion"]
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def exec_plugin(
        self,
        plugin: dict[str, Any],
        command: str,
        *,
        container_id: str = "",
        netns: str = "",
        ifname: str = "eth0",
        args: dict[str, str] | None = None,
        prev: dict[str, Any] | None = None,
        stdin_override: bytes | None = None,
        env_override: dict[str, str] | None = None,
    ) -> dict[str, Any] | None:
        binary = self._binary(plugin["type"])
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": ifname,
            "CNI_PATH": os.pathsep.join(self.cni_path),
            **self.extra_env,
        }
        if args:
            env["CNI_ARGS"] = ";".join(f"{k}={v}" for k, v in args.items())
        if env_override is not None:
            env.update(env_override)
            env = {k: v for k, v in env.items() if v is not None}
        stdin = stdin_override if stdin_override is not None else json.dumps(self._netconf(plugin, prev)).encode()
        argv = [binary]
        if self.run_netns:
            # found on the runner's own PATH: the plugin's environment may carry another one
            argv = [shutil.which("nsenter") or "nsenter", f"--net={self.run_netns}", "--", binary]
        start = time.perf_counter()
        proc = subprocess.run(argv, input=stdin, env=env, capture_output=True, timeout=60)
        elapsed = time.perf_counter() - start
        out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        if proc.returncode != 0:
            raise CniInvocationError(plugin["type"], command, proc.returncode, out, err)
        result = json.loads(out) if out.strip() else None
        self.timings.append(PluginRun(plugin["type"], command, elapsed, result))
        return result

    def _cache_file(self, container_id: str, ifname: str) -> Path:
        return self.cache_dir / f"{self.conflist['name']}-{container_id}-{ifname}.json"

    def cached_result(self, container_id: str, ifname: str = "eth0") -> dict[str, Any] | None:
        f = self._cache_file(container_id, ifname)
        return json.loads(f.read_text()) if f.exists() else None

    # -- the runtime's verbs ------------------------------------------------------------------------------
    def add(
        self, container_id: str, netns: str, ifname: str = "eth0", args: dict[str, str] | None = None
    ) -> dict[str, Any]:
        prev: dict[str, Any] | None = None
        for plugin in self.conflist["plugins"]:
            prev = self.exec_plugin(
                plugin, "ADD", container_id=container_id, netns=netns, ifname=ifname, args=args, prev=prev
            )
        assert prev is not None, "the chain returned no result"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._cache_file(container_id, ifname).write_text(json.dumps(prev))
        return prev

    def delete(self, container_id: str, netns: str, ifname: str = "eth0", args: dict[str, str] | None = None) -> None:
        prev = self.cached_result(container_id, ifname)
        for plugin in reversed(self.conflist["plugins"]):
            self.exec_plugin(plugin, "DEL", container_id=container_id, netns=netns, ifname=ifname, args=args, prev=prev)
        self._cache_file(container_id, ifname).unlink(missing_ok=True)

    def check(self, container_id: str, netns: str, ifname: str = "eth0", args: dict[str, str] | None = None) -> None:
        prev = self.cached_result(container_id, ifname)
        if prev is None:
            raise FileNotFoundError(f"no cached result for {container_id}/{ifname}")
        for plugin in self.conflist["plugins"]:
            self.exec_plugin(
                plugin, "CHECK", container_id=container_id, netns=netns, ifname=ifname, args=args, prev=prev
            )

    def plugin_conf(self, plugin_type: str) -> dict[str, Any]:
        for plugin in self.conflist["plugins"]:
            if plugin["type"] == plugin_type:
                return dict(plugin)
        raise KeyError(plugin_type)
