"""Keep connections opened before enrolment working.

Conntrack starts tracking in a pod's netns only once rules that need it (our nat REDIRECTs) exist there.
With the kernel default `nf_conntrack_tcp_loose=1`, the next packet of a connection opened before that
is picked up mid-stream as a *new* conntrack entry and goes through the nat table: a REDIRECT that does
not insist on SYN sends it to the proxy, which knows nothing of it and answers with a reset. Setting
`nf_conntrack_tcp_loose=0` in the pod netns (before the rules go in) leaves such packets untracked, so
they reach their socket as before. The previous value is recorded and restored on removal, so the pod is
left exactly as it was. (A REDIRECT restricted to SYN packets in the rule builder would make this
unnecessary; it is harmless then.)
"""

from __future__ import annotations

import subprocess

KEY = "net.netfilter.nf_conntrack_tcp_loose"


def _sysctl(netns_path: str, *args: str) -> str:
    out = subprocess.run(["nsenter", f"--net={netns_path}", "sysctl", "-n", *args],
                         capture_output=True, text=True, timeout=10, check=False)
    if out.returncode != 0:
        raise OSError(f"sysctl {' '.join(args)} in {netns_path}: {out.stderr.strip() or out.returncode}")
    return out.stdout.strip()


def read_loose(netns_path: str) -> int | None:
    """The current value, or None where the sysctl does not exist (no conntrack in that netns)."""
    try:
        return int(_sysctl(netns_path, KEY))
    except (OSError, ValueError):
        return None


def set_loose(netns_path: str, value: int) -> None:
    _sysctl(netns_path, "-w", f"{KEY}={int(value)}")
