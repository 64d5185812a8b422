"""The agent's open-file limit and where its many descriptors go.

It keeps sockets per watched pod netns (nf_tables and routing changes, the eBPF drift shortcut's TC
watch), so the soft RLIMIT_NOFILE (often 1024) is lifted to the hard one, and those sockets are moved to
descriptors at or above FD_SETSIZE (1024): a library that waits with select() aborts the process on a
higher one (libnftables: "bit out of range 0 - FD_SETSIZE on fd_set"), and the sockets it opens take the
lowest free descriptor, which the watch sockets would otherwise fill."""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import socket

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


FD_SETSIZE = 1024


def moved_high(sock: socket.socket) -> socket.socket:
    """The socket on a descriptor at or above FD_SETSIZE (the original closed; blocking mode and timeout
    kept), or as it is when the open-file limit leaves no room there."""
    try:
        fd = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, FD_SETSIZE)
    except OSError:
        return sock
    try:
        moved = socket.socket(sock.family, sock.type, sock.proto, fileno=fd)
    except BaseException:
        os.close(fd)
        raise
    moved.settimeout(sock.gettimeout())
    sock.close()
    return moved
