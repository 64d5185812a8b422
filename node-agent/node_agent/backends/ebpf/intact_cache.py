"""The eBPF drift poll's shortcut for pods found intact.

Nothing announces a change to a pod's cgroup programs, pins or node-map entries, so every eBPF pod is
read back each drift interval (`pod_state.problems_and_hooks`: its pinned config, each pinned program,
its node entries, each hook of its cgroup, its pin directory's listing). Once that full read found a pod
intact, `IntactPods` remembers what it read, and the next polls ask only for what can change how the
pod's traffic is redirected, or what the full read would notice first:

- its pin directory's identity (inode, mtime): bpffs sets a directory's mtime whenever a pin is made,
  removed or renamed in it, so a missing, extra or replaced program or map shows there. The mtime comes
  from the kernel's coarse clock (one tick, 1-10 ms): a directory changed in the tick of the full read
  is not remembered (a second change in that tick would leave the same mtime);
- its entry in the node's config map (what the node programs read for the pod's netns);
- the program lists at its cgroup's hooks, as the full read asked for them (`pod_state.read_hooks`: the
  run list where an ancestor's program can override ours, the cgroup's own list elsewhere).

One stat, one map lookup and one query per hook (the full read makes about three times as many calls).
Where the node's change count runs (`bpf_watch`: the bpf(2) attaches, detaches and map writes of every
other process), a poll that finds it where it was at the pod's last look skips the map lookup, the hook
queries and the tcx query: nobody else can have changed them meanwhile; the stat (pins are files) and the
TC announcements stay.
Where inotify can be had, each remembered pod's pin directory (and the node's) is watched too (`pin_events`):
then `unchanged` answers for a whole drift pass at once which pods need no look at all (the count where it
was at their last look, no pin event, nothing queued on their TC socket), and the agent skips them.
A pod whose inbound is on TC also keeps a socket subscribed to its netns' TC and link announcements
from before its full read (`tc_watch`): nothing queued there (and no tcx program on its interfaces) stands
for the TC filters' dumps. Anything different, an error, a change in what the pod should have (spec, IPs,
cgroup, netns), every apply or removal of the pod (`forget`), and up to `FULL_EVERY` seconds after the
full read (`full_reads`) send the pod through the full read again. The TC sockets are held for at most a
quarter of the open-file limit's worth of pods (the others are read in full each time), and closed with their entry;
an entry not asked for in `FULL_EVERY` after it expired (a pod no longer checked) is dropped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from node_agent.backends.ebpf import bpfsys, pinning, pod_index
from node_agent.backends.ebpf.attach import Cgroup, CgroupError
from node_agent.backends.ebpf.pin_events import PinEvents
from node_agent.backends.ebpf.pod_state import Hooks, read_hooks
from node_agent.backends.ebpf.tc_watch import TcWatch
from node_agent.backends.full_reads import FULL_EVERY, full_read_period
from node_agent.kernel.fd_limit import raise_fd_limit

NODE = ""  # the pin-event key of the node's pin directory (the pod keys are uids)


@dataclass(frozen=True)
class Intact:
    """What the full read of one pod found, intact."""

    wanted: Hashable  # what the pod should have when it was read (spec, IPs, cgroup, netns)
    programs: tuple[str, ...]  # the wanted cgroup programs (their hooks)
    pins: tuple[int, int]  # the pin directory's (st_ino, st_mtime_ns)
    config_key: bytes  # the pod's key in the node config map
    config: bytes  # and its value there
    hooks: Hooks  # the hooks as read (with the pod's own program per attach type)
    until: float  # monotonic: read fully again from then on
    tc: TcWatch | None = None  # inbound on TC: its announcements since before the full read
    generation: int | None = None  # the node's change count read before the last look that found it intact
    watched: bool = False  # its pin directory is watched (pin_events) since before `pins` was read


class IntactPods:
    """Per pod uid, its last intact read. Thread-safe; the backend calls it with its lock held."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._by_pod: dict[str, Intact] = {}
        self._clock = clock
        self._max_watches: int | None = None  # TC sockets held at most (a quarter of the open-file limit)
        self.shortcuts = 0  # polls answered by the shortcut (for tests)
        self.quiet = 0  # of them, answered without the map and hook reads: the change count stood still
        self.unread = 0  # polls `unchanged` answered for (no look at all)
        self._pins: PinEvents | None = None
        self._pins_tried = False

    def may_watch(self) -> bool:
        """Whether one more pod may keep a TC watch socket."""
        if self._max_watches is None:
            self._max_watches = raise_fd_limit() // 4
        with self._lock:
            return sum(1 for e in self._by_pod.values() if e.tc is not None) < self._max_watches

    def remember(self, uid: str, wanted: Hashable, programs: tuple[str, ...], pdir: str, netns_cookie: int,
                 config: bytes, hooks: Hooks, tc: TcWatch | None = None, generation: int | None = None) -> None:
        """After a full read that found the pod intact (tc: its TC watch, opened before that read; kept
        here or closed; generation: the change count read before it). A pin directory that cannot be
        read, or changed in the coarse clock's current tick, leaves nothing remembered. Its pin directory is
        watched from before that identity is read."""
        with self._lock:
            watched = (events := self._events()) is not None and events.watch(uid, pdir)
        try:
            pins = pinning.settled_identity(pdir)
        except OSError:
            pins = None
        if pins is None:
            self.forget(uid)
            if tc is not None:
                tc.close()
            return
        now = self._clock()
        entry = Intact(wanted, programs, pins, pod_index.config_key(netns_cookie), config, hooks,
                       now + full_read_period(uid), tc, generation, watched)
        with self._lock:
            old = self._by_pod.pop(uid, None)
            stale = [u for u, e in self._by_pod.items() if e.until + FULL_EVERY < now]
            dropped = [self._drop(u) for u in stale]
            self._by_pod[uid] = entry
        for gone in (old, *dropped):
            if gone is not None and gone.tc is not None:
                gone.tc.close()

    def _events(self) -> PinEvents | None:
        """The pin-event watches (lock held), opened at the first use."""
        if not self._pins_tried:
            self._pins_tried = True
            self._pins = PinEvents.open()
        return self._pins

    def _drop(self, uid: str) -> Intact | None:
        """The pod's entry taken out and its pin directory unwatched (lock held)."""
        if self._pins is not None:
            self._pins.unwatch(uid)
        return self._by_pod.pop(uid, None)

    def forget(self, uid: str) -> None:
        with self._lock:
            gone = self._drop(uid)
        if gone is not None and gone.tc is not None:
            gone.tc.close()

    def clear(self) -> None:
        """Every entry dropped, the pin-event watches closed (the backend's close)."""
        with self._lock:
            gone, self._by_pod = list(self._by_pod.values()), {}
            if self._pins is not None:
                self._pins.close()
            self._pins, self._pins_tried = None, False
        for entry in gone:
            if entry.tc is not None:
                entry.tc.close()

    def unchanged(self, uids: Iterable[str], generation: int | None, node_dir: str) -> set[str]:
        """Of these pods, those that read as at their last look without a look: the node's change count
        (`generation`, read before this call) is where it was then, no pin was made or removed in their
        directory nor in the node's (`node_dir`) since, nothing is queued on their TC socket, and their
        full read is not due. A pod whose directory announced a change is forgotten (read in full next).
        Nothing is answered for while the count or the watches cannot be had; events lost (a queue
        overflow) leave no pod watched until its next full read (its polls compare its pin directory)."""
        if generation is None:
            return set()
        with self._lock:
            if (events := self._events()) is None:
                return set()
            changed, lost = events.drain()
            if lost:
                self._by_pod = {uid: replace(e, watched=False) for uid, e in self._by_pod.items()}
            new_node = not events.watching(NODE)
            if new_node:  # its past is unknown: from now on
                events.watch(NODE, node_dir)
            gone = [self._drop(uid) for uid in changed - {NODE}]
            if lost or new_node or NODE in changed:
                entries = {}
            else:
                entries = {uid: e for uid in uids if (e := self._by_pod.get(uid)) is not None}
        for entry in gone:
            if entry is not None and entry.tc is not None:
                entry.tc.close()
        now = self._clock()
        out = {uid for uid, e in entries.items() if e.watched and e.generation == generation and now < e.until
               and (e.tc is None or e.tc.quiet(tcx=False))}
        self.unread += len(out)
        return out

    def still(self, uid: str, wanted: Hashable, pdir: str, cg: Path, config_fd: int | None,
              generation: int | None = None) -> bool:
        """Whether the pod reads as it did at its last intact read (then it is intact: the caller skips
        the full read). config_fd: the node config map, open (None: no shortcut); generation: the node's
        change count, read before this call (None: not counted here)."""
        with self._lock:
            known = self._by_pod.get(uid)
        if known is None or config_fd is None or known.wanted != wanted or self._clock() >= known.until:
            return False
        quiet = generation is not None and generation == known.generation
        try:
            if pinning.dir_identity(pdir) != known.pins:
                return False
            if not quiet:
                if bpfsys.map_lookup(config_fd, known.config_key, len(known.config)) != known.config:
                    return False
                with Cgroup(cg) as c:
                    if read_hooks(c, known.programs, known.hooks.own) != known.hooks:
                        return False
            if known.tc is not None and not known.tc.quiet(tcx=not quiet):
                return False
        except (OSError, CgroupError, bpfsys.BpfSysError):
            return False
        self.shortcuts += 1
        if quiet:
            self.quiet += 1
        elif generation is not None:  # as it was, read after the count: the next poll compares with this one
            with self._lock:
                if self._by_pod.get(uid) is known:
                    self._by_pod[uid] = replace(known, generation=generation)
        return True
