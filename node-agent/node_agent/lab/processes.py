"""Start and stop the lab's long-lived processes (agent, reference proxy) inside the node's netns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEADRACE = str(Path(sys.executable).parent / "headrace")
PYTHON = sys.executable


@dataclass
class LabProcess:
    name: str
    pid: int
    log: Path

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        # A zombie child of ours counts as gone.
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().split(") ", 1)[1][0] != "Z"
        except OSError:
            return False

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after timeout. Our children are reaped; others are polled."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(self.pid, os.WNOHANG)[0] == self.pid:
                        return
                except ChildProcessError:
                    if not self.alive():
                        return
                time.sleep(0.05)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.pid, "log": str(self.log)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabProcess:
        return cls(data["name"], int(data["pid"]), Path(data["log"]))


def start_in_netns(name: str, netns_path: str, argv: list[str], log: Path, stdout: Path | None = None) -> LabProcess:
    """Run argv inside netns_path (nsenter keeps /sys mounted), detached from our session."""
    log.parent.mkdir(parents=True, exist_ok=True)
    err = open(log, "ab")
    out = open(stdout, "ab") if stdout else err
    try:
        proc = subprocess.Popen(
            ["nsenter", f"--net={netns_path}", "--", *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    finally:
        err.close()
        if out is not err:
            out.close()
    return LabProcess(name, proc.pid, log)


def agent_status(cni_socket: Path) -> list[dict[str, Any]]:
    """The pods the agent reports (`headrace status --json`); empty when it does not answer."""
    proc = subprocess.run(
        [HEADRACE, "status", "--json", "--cni-socket", str(cni_socket)],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    if proc.returncode != 0:
        return []
    data = json.loads(proc.stdout)
    pods = data.get("pods", []) if isinstance(data, dict) else data
    return [p for p in pods if isinstance(p, dict)]


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out
