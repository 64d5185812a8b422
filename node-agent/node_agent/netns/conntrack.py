"""Keep connections opened before enrolment working.

Conntrack starts tracking in a pod's netns only once rules that need it (our nat REDIRECTs) exist there.
With the kernel default `nf_conntrack_tcp_loose=1`, the next packet of a connection opened before that
is picked up mid-stream as a *new* conntrack entry and goes through the nat table: a REDIRECT that does
not insist on SYN sends it to the proxy, which knows nothing of it and answers with a reset. Setting
`nf_conntrack_tcp_loose=0` in the pod netns (before the rules go in) leaves such packets untracked, so
they reach their socket as before. The previous value is recorded and restored on removal, so the pod is
left exactly as it was. (A REDIRECT restricted to SYN packets in the rule builder would make this
unnecessary; it is harmless then.)

The sysctl is read and written in-process: a pooled thread (node_agent.kernel.netns_runner) enters the
pod netns and uses /proc/sys/net (resolved in the netns of the thread that opens it); no process or
thread is started. The file is read and written with bare os calls (open, read or write, close): every
pod enrolled does both, and a Python file object adds four more syscalls to each.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from cni.kernel.netns import NetnsThreadTimeout
from node_agent.kernel.netns_runner import run_in_netns

KEY = "net.netfilter.nf_conntrack_tcp_loose"
_PATH = "/proc/sys/net/netfilter/nf_conntrack_tcp_loose"
T = TypeVar("T")


def read_loose_here() -> int | None:
    """The value in the calling thread's netns, or None where the sysctl does not exist (no conntrack)."""
    try:
        fd = os.open(_PATH, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return int(os.read(fd, 64).strip())
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return None


def set_loose_here(value: int) -> None:
    """Set it in the calling thread's netns (OSError naming the sysctl)."""
    try:
        fd = os.open(_PATH, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, f"{int(value)}\n".encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise OSError(f"sysctl {KEY}: {exc.strerror or exc}") from exc


def _in_netns(netns_path: str, job: Callable[[], T]) -> T:
    """`job` on a pooled thread inside the netns; its OSError (or a timeout) as OSError naming the netns."""
    try:
        return run_in_netns(netns_path, job, timeout=10.0)
    except NetnsThreadTimeout as exc:
        raise OSError(f"sysctl {KEY} in {netns_path}: {exc}") from None
    except OSError as exc:
        raise OSError(f"in {netns_path}: {exc.strerror or exc}") from exc


def read_loose(netns_path: str) -> int | None:
    """The current value in that netns, or None where the sysctl does not exist (no conntrack there)."""
    try:
        return _in_netns(netns_path, read_loose_here)
    except OSError:
        return None


def set_loose(netns_path: str, value: int) -> None:
    _in_netns(netns_path, lambda: set_loose_here(value))
