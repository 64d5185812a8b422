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
thread is started.
"""

from __future__ import annotations

from pathlib import Path

from cni.kernel.netns import NetnsThreadTimeout
from node_agent.kernel.netns_runner import run_in_netns

KEY = "net.netfilter.nf_conntrack_tcp_loose"
_PATH = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_loose")


def _in_netns(netns_path: str, value: int | None) -> str:
    def job() -> str:
        if value is not None:
            _PATH.write_text(f"{int(value)}\n")
        return _PATH.read_text().strip()

    try:
        return run_in_netns(netns_path, job, timeout=10.0)
    except NetnsThreadTimeout as exc:
        raise OSError(f"sysctl {KEY} in {netns_path}: {exc}") from None
    except OSError as exc:
        raise OSError(f"sysctl {KEY} in {netns_path}: {exc.strerror or exc}") from exc


def read_loose(netns_path: str) -> int | None:
    """The current value, or None where the sysctl does not exist (no conntrack in that netns)."""
    try:
        return int(_in_netns(netns_path, None))
    except (OSError, ValueError):
        return None


def set_loose(netns_path: str, value: int) -> None:
    _in_netns(netns_path, value)
