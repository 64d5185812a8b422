"""Follow the node proxy's cgroup: pids seen on the proxy's sockets → its cgroup v2 directory → the eBPF
backend's `set_proxy_cgroup` (ambient SO_ORIGINAL_DST is answered there).

The proxy hub reports the pids connected to the gRPC socket when a session opens (unix_peers.py) and the
netns-fd side channel reports SO_PEERCRED of each connection (netns_fd_channel.py). For each report:
/proc/PID/cgroup → the `0::` path → a directory under a cgroup2 mount (proxy_cgroup.py), checked by the pid
being listed in its cgroup.procs (else the mounts are searched for it, as needed when the agent runs in a
cgroup namespace of its own). A proxy in the root cgroup or in a cgroup holding the agent is refused; an
explicit --proxy-cgroup always wins (a different detection is logged). The result: `source`
(flag | peer | none) and `path`, shown by `headrace status` and the metric headrace_agent_proxy_cgroup_source.

The path in use is saved in the state dir (`proxy-cgroup`): a restarted agent builds its backend with it
(`saved_proxy_cgroup`), so the node-level program pinned by the previous agent is detached from where it
really is when the proxy turns out to have moved, and pods enrolled before the proxy reconnects use eBPF.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node_agent.proxy.cgroup import (
    Cgroup2Mount,
    ProxyCgroupError,
    Source,
    cgroup2_mounts,
    directory_of,
    refusal,
    unified_path,
)

log = logging.getLogger("headrace.proxy_cgroup")

MAX_SEARCH_DIRS = 50000


@dataclass(frozen=True)
class Located:
    pid: int
    cgroup: str  # the /proc/PID/cgroup v2 path
    directory: Path


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _lists_pid(directory: Path, pid: int) -> bool:
    try:
        return str(pid) in _read(str(directory / "cgroup.procs")).split()
    except OSError:
        return False


def _search(pid: int, mounts: list[Cgroup2Mount]) -> Path | None:
    """The directory whose cgroup.procs lists pid, below any cgroup2 mount (bounded walk)."""
    seen = 0
    for m in mounts:
        for dirpath, _dirs, _files in os.walk(m.mountpoint):
            seen += 1
            if seen > MAX_SEARCH_DIRS:
                return None
            if _lists_pid(Path(dirpath), pid):
                return Path(dirpath)
    return None


def locate(pid: int, proc_root: str = "/proc", mountinfo: str = "/proc/self/mountinfo") -> Located:
    """The cgroup v2 directory process `pid` is in. Raises ProxyCgroupError/OSError."""
    path = unified_path(_read(f"{proc_root}/{pid}/cgroup"))
    mounts = cgroup2_mounts(_read(mountinfo))
    if not mounts:
        raise ProxyCgroupError("no cgroup2 filesystem is mounted here (the DaemonSet mounts the host's "
                               "/sys/fs/cgroup)")
    guess = directory_of(path, mounts)
    if guess is not None and _lists_pid(Path(guess), pid):
        return Located(pid, path, Path(guess))
    found = _search(pid, mounts)
    if found is None:
        raise ProxyCgroupError(f"pid {pid} (cgroup {path}) is in no directory under the cgroup2 mounts "
                               f"{', '.join(m.mountpoint for m in mounts)}")
    return Located(pid, path, found)


def own_cgroup(proc_root: str = "/proc") -> str | None:
    try:
        return unified_path(_read(f"{proc_root}/self/cgroup"))
    except (OSError, ProxyCgroupError):
        return None


def saved_proxy_cgroup(state_file: Path) -> Path | None:
    """The proxy cgroup a previous agent used, if its directory still exists."""
    try:
        text = state_file.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if not text.startswith("/"):
        return None
    path = Path(text)
    if not path.is_dir():
        log.info("saved proxy cgroup %s is gone", path, extra={"step": "proxy-cgroup", "cgroup": text})
        return None
    return path


def save_proxy_cgroup(state_file: Path, path: Path | None) -> None:
    try:
        if path is None:
            state_file.unlink(missing_ok=True)
            return
        state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_file.with_name(f".{state_file.name}.tmp")
        tmp.write_text(f"{path}\n", encoding="utf-8")
        os.replace(tmp, state_file)
    except OSError as exc:
        log.warning("cannot save the proxy cgroup: %s", exc, extra={"step": "proxy-cgroup"})


def _same(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


class ProxyCgroupFollower:
    """Thread-safe: `observe` is called from the proxy hub's and the side channel's threads."""

    def __init__(
        self,
        apply: Callable[[Path | None], None] | None,
        flag: Path | None = None,
        *,
        on_change: Callable[[Source], None] | None = None,
        locate_fn: Callable[[int], Located] = locate,
        agent_cgroup: str | None = None,
        state_file: Path | None = None,
        restored: Path | None = None,
    ) -> None:
        """apply: the backend's set_proxy_cgroup (None: the node's backend needs no proxy cgroup, detection
        is only reported). flag: --proxy-cgroup, which always wins. state_file: where the path in use is
        saved; restored: the saved path the backend was built with (source peer until the proxy reconnects)."""
        self._apply = apply
        self.flag = flag
        self._on_change = on_change
        self._locate = locate_fn
        self._agent_cgroup = agent_cgroup if agent_cgroup is not None else own_cgroup()
        self._lock = threading.Lock()
        self._state_file = state_file
        self.source: Source = "flag" if flag is not None else ("peer" if restored is not None else "none")
        self.path: Path | None = flag if flag is not None else restored
        self.detected: Located | None = None
        self.via = "saved" if flag is None and restored is not None else ""
        self.problem = ""  # why the last detection was not used (refused, ambiguous, backend error)
        self.changes = 0
        if state_file is not None and flag is not None:
            save_proxy_cgroup(state_file, flag)  # the backend attaches there: a later start without it resumes

    def observe(self, pids: Iterable[int], via: str) -> None:
        """Pids connected to the proxy's socket `via` ("grpc" or "netns-fd")."""
        wanted = sorted({p for p in pids if p > 0 and p != os.getpid()})
        if not wanted:
            return
        with self._lock:
            found: list[Located] = []
            for pid in wanted:
                try:
                    found.append(self._locate(pid))
                except (OSError, ProxyCgroupError) as exc:
                    log.warning("cannot read the node proxy's cgroup: %s", exc,
                                extra={"step": "proxy-cgroup", "pid": pid, "via": via})
            if not found:
                return
            if len({str(f.directory) for f in found}) > 1:
                self._problem(f"{via} peers are in different cgroups: "
                              + ", ".join(f"pid {f.pid}: {f.directory}" for f in found), via, logging.WARNING)
                return
            self._take(found[0], via)

    def _problem(self, text: str, via: str, level: int, **fields: Any) -> None:
        if text != self.problem:
            log.log(level, "proxy cgroup not used: %s", text, extra={"step": "proxy-cgroup", "via": via, **fields})
        self.problem = text

    def _take(self, loc: Located, via: str) -> None:
        fields = {"pid": loc.pid, "cgroup": str(loc.directory)}
        previous = self.detected
        self.detected, self.via = loc, via
        reason = refusal(loc.cgroup, self._agent_cgroup)
        if reason is not None:
            if self.source == "peer":
                # the proxy moved somewhere we refuse: stop answering in its old cgroup; ambient pods not yet
                # on eBPF stay on the iptables fallback (the backend's fallback_reason)
                self._set(None, "none", via)
            # an error only where it matters (the eBPF backend); an iptables node just reports it
            self._problem(f"refused: {reason}", via, logging.ERROR if self._apply else logging.INFO, **fields)
            return
        if self.flag is not None:
            if not _same(self.flag, loc.directory) and (previous is None or previous.directory != loc.directory):
                log.warning("--proxy-cgroup %s wins over the node proxy's detected cgroup %s", self.flag,
                            loc.directory, extra={"step": "proxy-cgroup", "via": via, "flag": str(self.flag), **fields})
            self.problem = ""
            return
        if self.source == "peer" and self.path is not None and _same(self.path, loc.directory):
            self.problem = ""
            return
        self._set(loc.directory, "peer", via, **fields)

    def _set(self, path: Path | None, source: Source, via: str, **fields: Any) -> None:
        if self._apply is not None:
            try:
                self._apply(path)
            except Exception as exc:  # BackendError and friends: keep what we had
                self._problem(f"the backend refused {path}: {exc}", via, logging.ERROR, **fields)
                return
        old = self.path
        self.source, self.path, self.problem = source, path, ""
        if self._state_file is not None:
            save_proxy_cgroup(self._state_file, path)
        self.changes += 1
        log.info("node proxy cgroup %s (was %s, source %s)", path or "unset", old or "unset", source,
                 extra={"step": "proxy-cgroup", "via": via, "source": source, **fields})
        if self._on_change is not None:
            self._on_change(source)

    def status(self) -> dict[str, Any]:
        with self._lock:
            d = self.detected
            return {
                "source": self.source,
                "path": str(self.path) if self.path is not None else "",
                "needed": self._apply is not None,
                "detected": str(d.directory) if d is not None else "",
                "detected_pid": d.pid if d is not None else 0,
                "via": self.via,
                "problem": self.problem,
                "changes": self.changes,
            }
