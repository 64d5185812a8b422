"""The node proxy's cgroup v2 directory from what the kernel says about its process (pure: text in, answer out).

Ambient over eBPF answers SO_ORIGINAL_DST with a getsockopt program on the node proxy's cgroup. The agent
learns the proxy's pid from its connections (proxy_cgroup_follow.py) and turns it into a directory here:

- `unified_path(text)`: the `0::/path` line of /proc/PID/cgroup (cgroup v2; on a hybrid host the v1 lines
  are skipped);
- `cgroup2_mounts(text)` / `directory_of(path, mounts)`: where that path is mounted for this process, from
  /proc/self/mountinfo (hybrid hosts: /sys/fs/cgroup/unified, pure v2: /sys/fs/cgroup; a mount of a subtree,
  as in a container, has its root field set, and paths are relative to the reader's cgroup namespace);
- `refusal(proxy, agent)`: a proxy cgroup that would cover too much (the root cgroup, or a cgroup that holds
  the agent itself) is refused with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

Source = Literal["flag", "peer", "none"]
SOURCES: tuple[Source, ...] = ("flag", "peer", "none")

_OCTAL = re.compile(r"\\([0-7]{3})")


class ProxyCgroupError(ValueError):
    """A /proc or mountinfo text that does not name a usable cgroup v2 directory."""


@dataclass(frozen=True)
class Cgroup2Mount:
    root: str  # the mounted subtree, relative to the reader's cgroup namespace ("/" for the whole tree)
    mountpoint: str


def unified_path(cgroup_text: str) -> str:
    """The cgroup v2 path of a /proc/PID/cgroup file (its `0::` line), e.g. `/kubepods/pod<uid>/<id>`."""
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or parts[0] != "0" or parts[1] != "":
            continue
        path = parts[2]
        if path.endswith(" (deleted)"):
            raise ProxyCgroupError(f"the process's cgroup {path[: -len(' (deleted)')]} was removed")
        if not path.startswith("/"):
            raise ProxyCgroupError(f"unexpected cgroup v2 path {path!r}")
        return path
    raise ProxyCgroupError("no cgroup v2 line (`0::/...`): the process is in cgroup v1 hierarchies only")


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def cgroup2_mounts(mountinfo_text: str) -> list[Cgroup2Mount]:
    """The cgroup2 mounts of a /proc/PID/mountinfo text, in mount order; when several are mounted on the
    same mountpoint only the last (the visible one) is kept."""
    found: dict[str, Cgroup2Mount] = {}
    for line in mountinfo_text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or right.split()[:1] != ["cgroup2"]:
            continue
        m = Cgroup2Mount(root=_unescape(fields[3]), mountpoint=_unescape(fields[4]))
        found.pop(m.mountpoint, None)
        found[m.mountpoint] = m
    return list(found.values())


def segments(path: str) -> list[str]:
    """Components of a cgroup path; `..` stays (a path outside the reader's cgroup namespace)."""
    return [s for s in path.split("/") if s and s != "."]


def directory_of(path: str, mounts: list[Cgroup2Mount]) -> PurePosixPath | None:
    """The directory of cgroup v2 path `path` under one of `mounts`, or None when no mount shows it
    (outside this cgroup namespace, or below no mounted subtree)."""
    segs = segments(path)
    if ".." in segs:
        return None
    for m in mounts:
        root = segments(m.root)
        if ".." in root or segs[: len(root)] != root:
            continue
        return PurePosixPath(m.mountpoint, *segs[len(root) :])
    return None


def refusal(proxy_path: str, agent_path: str | None) -> str | None:
    """Why the proxy's cgroup must not be used (None: fine). Paths are /proc/PID/cgroup v2 paths."""
    proxy = segments(proxy_path)
    if not proxy:
        return (f"the node proxy runs in the root cgroup ({proxy_path}); a program there would act for every "
                "process of the node: run the proxy in its own cgroup (as a pod) or pass --proxy-cgroup")
    if all(s == ".." for s in proxy):
        # an ancestor of the reader's cgroup-namespace root, hence of the agent's cgroup
        return (f"the node proxy's cgroup {proxy_path} contains the agent's cgroup namespace; it would cover "
                "far more than the proxy: run the proxy in its own cgroup or pass --proxy-cgroup")
    if agent_path is not None:
        agent = segments(agent_path)
        if proxy == agent:
            return (f"the node proxy runs in the agent's own cgroup ({proxy_path}); the proxy's cgroup would "
                    "then cover the agent too: run the proxy in its own cgroup (as a pod) or pass --proxy-cgroup")
        if agent[: len(proxy)] == proxy:
            return (f"the node proxy's cgroup {proxy_path} contains the agent's cgroup ({agent_path}); it would "
                    "cover far more than the proxy: run the proxy in its own cgroup or pass --proxy-cgroup")
    return None
