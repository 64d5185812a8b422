"""Where a pod's redirection goes: its netns located (a CNI event's CNI_NETNS, the /proc + cgroup scan, or
the named-netns IP match), pinned by inode, verified before each use; its cgroup v2 directory read from
the scan (eBPF attaches there)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from node_agent.backends.base import PodTarget
from node_agent.backends.ebpf import pod_cgroup
from node_agent.netns.finder import NetnsLocation, NetnsNotFound, pick
from node_agent.netns.pin import PinError, RecycledNetns
from node_agent.reconcile.state import Pins, PodState

ScanFn = Callable[[], dict[str, list[NetnsLocation]]]


class Scan:
    """One /proc scan per reconcile pass, taken when first needed."""

    def __init__(self, scan: ScanFn) -> None:
        self._scan = scan
        self._found: dict[str, list[NetnsLocation]] | None = None

    def of(self, uid: str) -> list[NetnsLocation]:
        if self._found is None:
            self._found = self._scan()
        return self._found.get(uid, [])


class PodNetns:
    def __init__(
        self,
        pins: Pins,
        scan: ScanFn,
        find_by_ips: Callable[[str, tuple[str, ...]], NetnsLocation],
        read_ips: Callable[[str], tuple[str, ...]],
        *,
        needs_cgroup: bool,
    ) -> None:
        self.pins = pins
        self._scan = scan
        self._find_by_ips = find_by_ips
        self.read_ips = read_ips
        self.needs_cgroup = needs_cgroup  # the node's backend attaches to the pod's cgroup

    def new_scan(self) -> Scan:
        return Scan(self._scan)

    def target(self, st: PodState) -> PodTarget:
        """Where to act on the pod: its pinned netns, verified to still be the pod's (raises PinError)."""
        path = self.pins.verify(st.uid, st.inode)
        return PodTarget(st.uid, st.namespace, st.name, path, st.inode, st.ips, st.cgroup_path)

    def pin(self, uid: str, source: str, inode: int) -> str:
        """Pin the netns at `source` (expected inode) for the pod; a pin of an older sandbox is released
        and replaced. Raises PinError/OSError."""
        try:
            return self.pins.pin(uid, source, inode)
        except RecycledNetns as exc:
            if exc.errno != errno.EEXIST:  # the source is not that netns (or changed while pinned)
                raise
        self.pins.release(uid)  # the pin holds another (an older sandbox's) netns
        return self.pins.pin(uid, source, inode)

    def fill_cgroup(self, st: PodState, scan: Scan) -> None:
        """The pod's cgroup v2 directory, when the node's backend needs it and it is not known yet: the one
        the kubelet made for the pod below a cgroup root (a few stats; there before any process of the pod,
        as at a CNI ADD under containerd or CRI-O), else from its processes in its (pinned) netns (a /proc
        scan: a kubelet with another cgroup root, or another runtime)."""
        if st.cgroup_path or not self.needs_cgroup:
            return
        found = pod_cgroup.find(st.uid)
        if found is not None:
            st.cgroup_path = str(found)
            return
        for loc in scan.of(st.uid):
            if loc.inode == st.inode and loc.cgroup_path:
                st.cgroup_path = loc.cgroup_path
                return
        st.cgroup_path = None

    def find(self, uid: str, ips: tuple[str, ...], scan: Scan) -> NetnsLocation:
        """A pod's netns from the scan, else by its IPs (not pinned). Raises LookupError/OSError."""
        try:
            return pick(uid, scan.of(uid))
        except NetnsNotFound:
            if not ips:
                raise
            return self._find_by_ips(uid, ips)

    def locate(self, st: PodState, hint_netns: str, scan: Scan) -> None:
        """Make sure st.netns is a verified pin: the one held, else the CNI event's netns (hint_netns),
        else the scan or the IP match. Raises PinError/LookupError/OSError."""
        if st.inode and st.netns:
            try:
                self.pins.verify(st.uid, st.inode)
            except PinError:
                st.netns, st.inode, st.rules_in = "", 0, False
                raise
            self.fill_cgroup(st, scan)  # adopted from an agent that did not need it
            return
        if hint_netns:
            ino = os.stat(hint_netns).st_ino
            st.netns = self.pin(st.uid, hint_netns, ino)
            st.inode = ino
            self.fill_cgroup(st, scan)
            return
        try:
            loc = pick(st.uid, scan.of(st.uid))
        except NetnsNotFound:
            if not st.ips:
                raise
            loc = self._find_by_ips(st.uid, st.ips)
        st.netns = self.pin(st.uid, loc.path, loc.inode)
        st.inode = loc.inode
        st.cgroup_path = loc.cgroup_path
        if not st.cgroup_path:
            self.fill_cgroup(st, scan)
