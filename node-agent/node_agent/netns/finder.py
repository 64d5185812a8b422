"""Find a running pod's network namespace without the runtime: scan /proc for processes whose
cgroup path names the pod UID, and read their /proc/PID/ns/net inode.

Kubelet puts every container of a pod under a cgroup directory named for the pod UID: `pod<uid>` with the
cgroupfs driver, `kubepods-...-pod<uid_with_underscores>.slice` with systemd. Processes in the agent's own
netns (host-network pods) never count. When the processes of one pod disagree about their netns, the one
most of them share wins only if it is the only non-host one; otherwise the pod is ambiguous.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from node_agent.kernel.netns_addresses import read_addresses

_POD_RE = re.compile(r"pod([0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{12})")
CGROUP2_ROOT = Path("/sys/fs/cgroup/unified")


class NetnsNotFound(LookupError):
    """No process of the pod runs in a netns we can see."""


class NetnsAmbiguous(LookupError):
    """The pod's processes are in more than one netns."""


@dataclass(frozen=True)
class NetnsLocation:
    uid: str
    pid: int
    path: str  # /proc/<pid>/ns/net: valid only while the process lives; pin it at once
    inode: int
    cgroup_path: str | None = None  # cgroup v2 directory of the pod, when the process has one


def normalise_uid(uid: str) -> str:
    return uid.lower().replace("_", "-")


def pod_uids_in_cgroup(text: str) -> tuple[set[str], str | None]:
    """Pod UIDs named anywhere in a /proc/PID/cgroup file, and the pod's cgroup v2 directory if any."""
    uids: set[str] = set()
    v2_dir: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for match in _POD_RE.finditer(parts[2]):
            uids.add(normalise_uid(match.group(1)))
            if parts[0] == "0" and parts[1] == "":
                # the pod directory itself: cut after the segment that names the pod
                segs = parts[2].split("/")
                for i, seg in enumerate(segs):
                    if match.group(0) in seg:
                        v2_dir = str(CGROUP2_ROOT) + "/".join(segs[: i + 1])
                        break
    return uids, v2_dir


def own_netns_inode(proc_root: str = "/proc") -> int:
    return os.stat(f"{proc_root}/self/ns/net").st_ino


def scan(proc_root: str = "/proc") -> dict[str, list[NetnsLocation]]:
    """Every pod UID seen in /proc with the processes (and their netns) found for it."""
    host_ino = own_netns_inode(proc_root)
    found: dict[str, list[NetnsLocation]] = {}
    for pid in (int(name) for name in os.listdir(proc_root) if name.isdigit()):  # no other process info read
        try:
            with open(f"{proc_root}/{pid}/cgroup", encoding="utf-8") as fh:
                text = fh.read()
        except OSError:
            continue
        if "pod" not in text:
            continue
        uids, v2_dir = pod_uids_in_cgroup(text)
        if not uids:
            continue
        path = f"{proc_root}/{pid}/ns/net"
        try:
            ino = os.stat(path).st_ino
        except OSError:
            continue
        if ino == host_ino:
            continue
        for uid in uids:
            found.setdefault(uid, []).append(NetnsLocation(uid, pid, path, ino, v2_dir))
    return found


def pick(uid: str, locations: list[NetnsLocation]) -> NetnsLocation:
    if not locations:
        raise NetnsNotFound(f"no process of pod {uid} found in a pod netns")
    inodes = Counter(loc.inode for loc in locations)
    if len(inodes) > 1:
        raise NetnsAmbiguous(f"pod {uid} processes are in {len(inodes)} different netns")
    # prefer the oldest process (the sandbox/pause), which lives as long as the netns is in use
    return min(locations, key=lambda loc: loc.pid)


def find_pod_netns(uid: str, proc_root: str = "/proc") -> NetnsLocation:
    return pick(uid, scan(proc_root).get(normalise_uid(uid), []))


def read_netns_ips(netns_path: str) -> tuple[str, ...]:
    """The global unicast addresses inside a netns (pods whose source object carries no IPs), read
    in-process (node_agent.kernel.netns_addresses). OSError when it cannot be read."""
    return read_addresses(netns_path)


NAMED_NETNS_DIRS = ("/run/netns", "/var/run/netns")


class IpMatcher:
    """Second strategy, for pods without a process in a kubelet-style cgroup (e.g. a runtime that does not
    name cgroups by pod UID, or the lab's bare netns): the named netns (runtimes keep sandbox netns under
    /run/netns) whose global addresses include the pod's IPs from the pod source. Only an unambiguous
    match counts: exactly one netns holding all of the pod's IPs. Address sets are cached per netns inode,
    for as long as the netns is there.
    """

    def __init__(self, dirs: tuple[str, ...] = NAMED_NETNS_DIRS, ttl: float = 30.0) -> None:
        self.dirs = dirs
        self.ttl = ttl
        self._cache: dict[int, tuple[float, frozenset[str]]] = {}

    def _candidates(self) -> dict[int, str]:
        host = own_netns_inode()
        seen: dict[int, str] = {}
        for d in self.dirs:
            try:
                names = sorted(os.listdir(d))
            except OSError:
                continue
            for name in names:
                path = os.path.join(d, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if st.st_ino != host and st.st_ino not in seen and st.st_dev == os.stat("/proc/self/ns/net").st_dev:
                    seen[st.st_ino] = path
        return seen

    def _addresses(self, inode: int, path: str, now: float) -> frozenset[str]:
        hit = self._cache.get(inode)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        try:
            ips = frozenset(read_netns_ips(path))
        except (OSError, ValueError):
            ips = frozenset()
        if ips:
            self._cache[inode] = (now, ips)
        return ips

    def find(self, uid: str, ips: tuple[str, ...]) -> NetnsLocation:
        import ipaddress
        import time

        if not ips:
            raise NetnsNotFound(f"pod {uid} has no IPs to match a netns by")
        want = {str(ipaddress.ip_address(ip)) for ip in ips}
        now = time.monotonic()
        candidates = self._candidates()
        for gone in [ino for ino in self._cache if ino not in candidates]:  # a netns deleted since
            del self._cache[gone]
        matches = [(ino, path) for ino, path in candidates.items() if want <= self._addresses(ino, path, now)]
        if not matches:
            raise NetnsNotFound(f"no process of pod {uid} found, and no named netns holds {sorted(want)}")
        if len(matches) > 1:
            raise NetnsAmbiguous(f"{len(matches)} named netns hold the IPs of pod {uid}: refusing to guess")
        ino, path = matches[0]
        return NetnsLocation(uid, 0, path, ino, None)
