"""App servers and HTTP clients inside test pods, for the Envoy sidecar tests: each a child process
(tests/harness/envoy_app.py, run by the system python3) in the pod's netns and cgroup, as a pod's own
processes would be, so cgroup eBPF programs see them.

    with AppServer(pod.netns.path, pod.cgroup, "web", [(8080, 4, True), (9000, 6, False)]) as srv:
        reply = http_get(peer.netns.path, pod.ipv4, 8080, "/x", cgroup=peer.cgroup)   # HttpReply
        srv.seen()                                   # [Seen(port, kind, peer, local, path, data, headers)]
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.harness.envoy_bootstrap import hostport

APP_SCRIPT = Path(__file__).with_name("envoy_app.py")
PYTHON = "/usr/bin/python3"  # the child scripts run as other uids: the system interpreter, stdlib only


@dataclass
class HttpReply:
    status: int
    body: str
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)



@dataclass
class Seen:
    port: int
    kind: str
    peer: tuple[str, int]
    local: tuple[str, int]
    path: str | None
    data: bytes | None
    headers: dict[str, str]


class AppServer:
    """HTTP and TCP servers of a pod (a child process in its netns and cgroup); `seen()` lists every
    connection (TCP) or request (HTTP) it got, in order."""

    def __init__(self, netns_path: str, cgroup: str | None, label: str, ports: list[tuple[int, int, bool]]) -> None:
        """ports: (port, family, http)."""
        self.netns_path = netns_path
        self.spec = {
            "cgroup": cgroup,
            "label": label,
            "ports": [{"port": p, "family": f, "http": h} for p, f, h in ports],
        }
        self._proc: subprocess.Popen[str] | None = None
        self._seen: list[Seen] = []
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def __enter__(self) -> AppServer:
        argv = ["nsenter", f"--net={self.netns_path}", "--", PYTHON, str(APP_SCRIPT), "serve", json.dumps(self.spec)]
        pipe = subprocess.PIPE
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=pipe, stderr=pipe, text=True)
        self._proc = proc
        assert proc.stdout is not None
        if not proc.stdout.readline():
            err = proc.stderr.read() if proc.stderr is not None else ""
            self.__exit__(None, None, None)
            raise OSError(f"app server {self.spec['label']} failed: {err.strip()}")
        self._reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._reader.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait(5)
            if self._reader is not None:
                self._reader.join(timeout=2)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        """The child's report lines (one JSON object each) until it exits."""
        assert proc.stdout is not None
        for line in proc.stdout:
            obj = json.loads(line)
            data = obj.get("data")
            seen = Seen(
                int(obj["port"]),
                str(obj["kind"]),
                (str(obj["peer"][0]), int(obj["peer"][1])),
                (str(obj["local"][0]), int(obj["local"][1])),
                obj.get("path"),
                bytes.fromhex(data) if data is not None else None,
                dict(obj.get("headers") or {}),
            )
            with self._lock:
                self._seen.append(seen)

    def seen(self, settle: float = 0.2) -> list[Seen]:
        """Everything seen so far, in order (after a short settle time: the child reports a connection
        before it answers, but the line can still be on its way to the reader thread)."""
        time.sleep(settle)
        with self._lock:
            return list(self._seen)


def http_get(
    netns_path: str,
    host: str,
    port: int,
    path: str = "/",
    *,
    cgroup: str | None = None,
    uid: int | None = None,
    gid: int | None = None,
    timeout: float = 5.0,
) -> HttpReply:
    """One HTTP GET from a child process in the netns (joined to cgroup, then as gid/uid if given)."""
    spec = {"cgroup": cgroup, "uid": uid, "gid": gid, "host": host, "port": port, "path": path, "timeout": timeout}
    argv = ["nsenter", f"--net={netns_path}", "--", PYTHON, str(APP_SCRIPT), "get", json.dumps(spec)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10)
    if proc.returncode != 0:
        what = f"GET http://{hostport(host, port)}{path} (uid {uid}, cgroup {cgroup})"
        raise ConnectionError(f"{what} failed: {proc.stderr.strip()}")
    out = json.loads(proc.stdout)
    return HttpReply(int(out["status"]), str(out["body"]), dict(out["headers"]))
