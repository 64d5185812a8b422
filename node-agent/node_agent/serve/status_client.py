"""`headrace status`: ask the local agent (STATUS on its plugin-event socket) and render the answer."""

from __future__ import annotations

import socket
import time
from typing import Any

from cni.contract import events
from cni.plugin.unix_connect import connect

COLUMNS = ("namespace", "name", "uid", "mode", "backend", "state", "netns")
MAX_REPLY_BYTES = 64 * 1024 * 1024  # the pod list of a busy node


class StatusError(Exception):
    """The agent could not be asked or answered badly."""


def query(socket_path: str, timeout: float = 5.0) -> dict[str, Any]:
    """The agent's STATUS answer (every wait bounded by `timeout` in all)."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        connect(sock, socket_path, StatusError, " (is the agent running?)")
        try:
            sock.sendall(events.encode_line(events.status_request()))
            line = events.read_line(sock, deadline, MAX_REPLY_BYTES)
        except events.LineTooLong as exc:
            raise StatusError("the agent's answer is too long") from exc
        except OSError as exc:
            raise StatusError(f"talking to the agent failed: {exc}") from exc
    finally:
        sock.close()
    try:
        reply = events.decode_line(line)
    except ValueError as exc:
        raise StatusError("the agent's answer is not JSON") from exc
    if not isinstance(reply, dict) or not reply.get(events.OK):
        err = reply.get(events.ERROR, "unknown error") if isinstance(reply, dict) else "bad reply"
        raise StatusError(f"the agent refused: {err}")
    if not isinstance(reply.get(events.PODS), list):
        raise StatusError("the agent's answer has no pod list")
    return reply


def state_text(pod: dict[str, Any]) -> str:
    state = str(pod.get("state", ""))
    reason = str(pod.get("reason", ""))
    proxy = str(pod.get("proxy", ""))
    if state == "enrolled" and proxy and proxy != "connected":  # ambient: the node proxy's session
        return f"{state}, proxy {proxy}"
    # boot race: agent_duties.py; alerts: eBPF programs on parent cgroups; fallback: reconcile/status.py
    if reason and (state in ("moving", "pending", "failed") or pod.get("boot_race") or pod.get("alerts")
                   or pod.get("fallback")):
        return f"{state} ({reason})"
    return state


def proxy_cgroup_text(cg: dict[str, Any]) -> str:
    """`proxy cgroup: <dir> (flag|peer)` or `proxy cgroup: none`, with why a detection was not used."""
    source = str(cg.get("source", "none"))
    text = f"proxy cgroup: {cg.get('path')} ({source})" if cg.get("path") else "proxy cgroup: none"
    if not cg.get("needed", True):
        text += " [not needed by this backend]"
    if cg.get("problem"):
        text += f"; {cg.get('problem')}"
    return text


def render_table(reply: dict[str, Any]) -> str:
    rows = [[str(p.get(c, "")) if c != "state" else state_text(p) for c in COLUMNS] for p in reply["pods"]]
    header = [c.upper() for c in COLUMNS]
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i])
              for i in range(len(COLUMNS))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    proxy = reply.get("proxy")
    if isinstance(proxy, dict):
        lines.append("")
        lines.append(f"proxy: {'connected' if proxy.get('connected') else 'not connected'}"
                     + (f" ({proxy.get('proxy_id')})" if proxy.get("proxy_id") else ""))
    cgroup = reply.get("proxy_cgroup")
    if isinstance(cgroup, dict):
        lines.append(proxy_cgroup_text(cgroup))
    return "\n".join(lines)
