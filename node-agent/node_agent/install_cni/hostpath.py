"""Resolve symlinks as the host does, from a process that sees the host's / at `host_root` (e.g. /host).

The kernel resolves a link's absolute target against this process's root, not the host's: a link
`05-cilium.conflist -> /var/lib/cilium/…` in the host's config dir, seen here at /host/etc/cni/net.d,
points into the container's own file system. `resolve` follows every link itself, hop by hop: an
absolute target T is looked up at host_root + T, a relative one relative to the link's directory, and
`..` stops at host_root (as in a chroot), so the result never leaves it.
"""

from __future__ import annotations

import os

#: Links followed at most for one path (Linux's MAXSYMLINKS).
MAX_HOPS = 40


class LinkError(Exception):
    """A path whose links cannot be followed (too many of them, or not under host_root)."""


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def _relative_to_root(path: str, root: str) -> list[str]:
    rel = os.path.relpath(os.path.abspath(path), root)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        raise LinkError(f"{path} is not under {root}")
    return _parts(rel)


def host_view(path: str, host_root: str = "/") -> str:
    """`path` (as this process sees it, under `host_root`) as the host names it."""
    return "/" + "/".join(_relative_to_root(path, os.path.abspath(host_root or "/")))


def resolve(path: str, host_root: str = "/", max_hops: int = MAX_HOPS) -> str:
    """`path` (as this process sees it, under `host_root`) with every link resolved as the host resolves
    it, as this process sees the result. A component that does not exist is kept as it is (like
    `os.path.realpath`): the caller finds out when it opens the result."""
    root = os.path.abspath(host_root or "/")
    pending = list(reversed(_relative_to_root(path, root)))  # a stack: the next component last
    done: list[str] = []  # components under root, none of them a link
    hops = 0
    while pending:
        part = pending.pop()
        if part == os.pardir:
            if done:
                done.pop()
            continue
        try:
            target = os.readlink(os.path.join(root, *done, part))
        except OSError:  # not a link, or missing
            done.append(part)
            continue
        hops += 1
        if hops > max_hops:
            raise LinkError(f"{path}: more than {max_hops} levels of symbolic links")
        if target.startswith("/"):
            done = []
        pending.extend(reversed(_parts(target)))
    return os.path.join(root, *done)
