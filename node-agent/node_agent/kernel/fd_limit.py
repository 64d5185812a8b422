"""The agent's open-file limit: it keeps a socket per watched pod netns (nf_tables and routing changes,
the eBPF drift shortcut's TC watch), so the soft RLIMIT_NOFILE (often 1024) is lifted to the hard one."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("headrace.agent.fd_limit")


def raise_fd_limit() -> int:
    """One socket per watched pod: lift the soft RLIMIT_NOFILE to the hard one (1024 is the usual soft
    limit; a node may run more pods). Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-file limit: %s", exc, extra={"step": "fd-limit"})
    return soft
