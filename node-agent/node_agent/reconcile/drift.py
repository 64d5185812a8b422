"""The drift check: an enrolled pod's redirection is read back and what is missing or altered is re-applied
(counted in headrace_agent_drift_repairs).

When a pod is read back:
- on change: a pod whose backend keeps its rules in nf_tables (nftables, iptables-nft) is watched
  (`repair.change_watch`: one thread; per pod netns an NFNLGRP_NFTABLES subscription and one to the
  rtnetlink rule, route and address groups, which cover its policy routing) and checked when its netns
  announces a change; the subscription is made once the pod is enrolled, and the pod is checked once
  right after (a change between its apply and the subscription is not missed);
- every drift interval (`--drift-interval`): the pods that are not watched (iptables-legacy sidecar
  pods, eBPF, or a failed subscription), and the part that announces nothing of pods that are watched
  for the rest (`PartlyAnnounced`: an eBPF ambient pod's programs and filters are polled, its inbound
  rules on nftables or iptables-nft and its policy routing are read on change and right after the
  subscription, `check_announced`; an iptables-legacy ambient pod's x_tables rules are polled, its policy
  routing is read on change); of these, the pods a `QuietPolls` backend answers for (nothing happened to
  them since their last read: eBPF's change count and pin events, iptables-legacy's x_tables change
  count) are skipped. A pod this agent applied
  during the pass itself (a wave of enrolments goes in during the pass's converge step) waits for the
  next poll: the wave is not read back while it goes in, each read holding the backend's lock between
  two applies, and a bypass after such an apply is still found within one interval;
- every backstop interval (`--drift-backstop`) and right after pods were enrolled on rules found in place
  (adoption): every pod, watched or not.
The read-back runs outside the lock, one pod at a time; a CNI request that arrives meanwhile is served
before the next pod. A pod whose pinned netns is gone: an ambient pod is `failed` and retried (never
reported enrolled), a sidecar pod is removed. A pod that leaves the table is unwatched (socket closed)."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from node_agent.backends.base import BackendError, PartlyAnnounced, PodTarget, QuietPolls, RedirectBackend, RedirectSpec
from node_agent.netns.pin import PinError
from node_agent.reconcile.choice import Backends
from node_agent.reconcile.pod_netns import PodNetns
from node_agent.reconcile.state import ENROLLED, FAILED, PENDING, SIDECAR, PodState, log_ctx
from node_agent.reconcile.table import PodTable
from node_agent.repair.change_watch import ChangeWatcher

log = logging.getLogger("headrace.agent.reconcile")

Job = tuple[PodState, RedirectBackend, PodTarget]


NODE = ""  # the watcher key of the agent's own netns (the node-level probe rules live there)
NODE_NETNS = "/proc/self/ns/net"


NODE_POLL = 10.0  # a node netns that announces nothing: its probe SNAT re-checked at most this often


@dataclass(frozen=True)
class Due:
    """The pods one pass reads back (None: every pod), and whether the node-level rules are re-checked
    too (a backstop pass, the node netns announced a change, or — when it announces nothing — a poll pass
    at least NODE_POLL after the last node check: on a node with kube-proxy's thousands of rules the
    node's iptables-save is the costliest read of a pass)."""

    uids: frozenset[str] | None
    node: bool
    partial: frozenset[str] = frozenset()  # of uids: only the part that announces nothing (PartlyAnnounced)
    announced: frozenset[str] = frozenset()  # of uids: only the part that announces its changes


_CAN: weakref.WeakKeyDictionary[RedirectBackend, dict[type, bool]] = weakref.WeakKeyDictionary()


def _can(backend: RedirectBackend, protocol: type) -> bool:
    """isinstance with a runtime-checkable protocol, answered once per backend (it looks up each of the
    protocol's methods, and this is asked for every pod of a pass)."""
    known = _CAN.setdefault(backend, {})
    if protocol not in known:
        known[protocol] = isinstance(backend, protocol)
    return known[protocol]


def partly_announced(backend: RedirectBackend) -> PartlyAnnounced | None:
    return cast(PartlyAnnounced, backend) if _can(backend, PartlyAnnounced) else None


def quiet_polls(backend: RedirectBackend) -> QuietPolls | None:
    return cast(QuietPolls, backend) if _can(backend, QuietPolls) else None


def _read(uid: str, st: PodState, backend: RedirectBackend, target: PodTarget, due: Due | None) -> list[str]:
    """One pod's check: of a partly announced backend's pod, only the part the pass is due for. Raises
    BackendError."""
    if due is not None and (partly := partly_announced(backend)) is not None:
        if uid in due.partial:
            return partly.check_unannounced(target, st.spec)
        if uid in due.announced:
            return partly.check_announced(target, st.spec)
    return backend.check(target, st.spec)


class DriftCheck:
    def __init__(
        self,
        table: PodTable,
        netns: PodNetns,
        backends: Backends,
        *,
        interval: float,
        remove_sidecar: Callable[[str], object],
        backstop: float = 120.0,
        events: bool = True,
        node_announces: bool = True,
        wake: Callable[[], None] = lambda: None,
        watcher_factory: Callable[[Callable[[str], None]], ChangeWatcher] = ChangeWatcher,
    ) -> None:
        """events: watch pods whose backend announces its changes (else every pod is polled);
        node_announces: the node's own probe rules are in nf_tables (False: x_tables, polled every
        NODE_POLL whatever the pods); wake: the reconcile loop's wake-up (a watched pod changed)."""
        self.table = table
        self.netns = netns
        self.backends = backends
        self.interval = interval
        self.backstop = max(backstop, interval)
        self.events = events
        self.node_announces = node_announces
        self._remove_sidecar = remove_sidecar
        self._wake = wake
        self._watcher_factory = watcher_factory
        self.watcher: ChangeWatcher | None = None  # made when the first pod is watched
        self.last_run = 0.0  # the last poll pass (the pods that are not watched)
        self.last_full = 0.0  # the last backstop pass (every pod)
        self.last_node = 0.0  # the last pass that re-checked the node-level rules
        self._soon = False  # pods were enrolled on rules found in place: run the drift pass now
        self._dirty_lock = threading.Lock()
        self._dirty: set[str] = set()  # watched pods (and NODE) that announced a change
        self._partly: frozenset[str] = frozenset()  # watched pods of which a part is polled (lock held)

    def watch_counts(self) -> dict[str, int]:
        """Change announcements reported so far and the netns watched now (for the metrics; any thread)."""
        w = self.watcher
        return {"events": w.events, "watched": len(w.keys())} if w is not None else {"events": 0, "watched": 0}

    def verify_soon(self) -> None:
        self._soon = True

    def changed(self, uid: str) -> None:
        """A watched pod's netns announced an nf_tables change (the watcher's thread): check it soon."""
        log.debug("nf_tables change announced", extra={"uid": uid, "step": "nft-change"})
        with self._dirty_lock:
            self._dirty.add(uid)
        self._wake()

    def next_due(self, now: float) -> float:
        """Seconds until the next timed pass (poll when a pod is polled, else the backstop)."""
        until_full = self.last_full + self.backstop - now
        return max(0.0, min(until_full, self.last_run + self.interval - now) if self._polled() else until_full)

    def _polled(self) -> bool:
        return any(self._is_polled(uid) for uid in self.table.pods)

    def _is_polled(self, uid: str) -> bool:
        """Read back on the timed passes: not watched, or only partly covered by its watch."""
        return uid in self._partly or not self._is_watched(uid)

    def _is_watched(self, uid: str) -> bool:
        return self.watcher is not None and self.watcher.watched(uid)

    def take_due(self, now: float) -> Due | None:
        """What this pass reads back (lock held), or None; a poll or backstop due counts as run now."""
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        if self._soon or now - self.last_full >= self.backstop:
            self.last_run = self.last_full = self.last_node = now
            self._soon = False
            return Due(None, True)
        uids = {uid for uid in dirty if uid in self.table.pods}
        announced = uids & self._partly  # a change announced, or the first look after the subscription
        timed = now - self.last_run >= self.interval and self._polled()
        node = NODE in dirty or (timed and not self._is_watched(NODE) and now - self.last_node >= NODE_POLL)
        partial: set[str] = set()
        if timed:
            self.last_run = now
            polled = {uid for uid, st in self.table.pods.items()
                      if self._is_polled(uid) and st.applied_at < now}
            partial = {uid for uid in polled - uids if uid in self._partly and self._is_watched(uid)}
            announced -= polled
            uids |= polled
        if node:
            self.last_node = now
        if not uids and not timed and not node:
            return None
        return Due(frozenset(uids), node, frozenset(partial), frozenset(announced))

    def close(self) -> None:
        """Every subscription closed (agent shutdown)."""
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None

    def sync_watches(self) -> None:
        """Watch every checked pod whose backend announces its changes; unwatch the others (their socket
        closed). A pod newly watched is checked once right after (lock not held: subscribing enters the
        pod netns)."""
        with self.table.lock:
            want: dict[str, tuple[str, int]] = {}
            partly: set[str] = set()
            for st in self.table.pods.values():
                if not self.events or not st.netns or (st.mode != SIDECAR and st.state != ENROLLED):
                    continue
                try:
                    backend = self.backends.of(st)
                except (BackendError, PinError):
                    continue
                if backend.change_events:
                    want[st.uid] = (st.netns, st.inode)
                elif (split := partly_announced(backend)) is not None and split.announces_part(st.spec):
                    want[st.uid] = (st.netns, st.inode)
                    partly.add(st.uid)
            self._partly = frozenset(partly)
        if not want and self.watcher is None:
            return
        if want and self.node_announces:  # the node's probe rules: re-checked when the node netns announces
            try:
                want[NODE] = (NODE_NETNS, os.stat(NODE_NETNS).st_ino)
            except OSError:
                pass
        if self.watcher is None:
            self.watcher = self._watcher_factory(self.changed)
            self.watcher.start()
        for uid in self.watcher.keys() - set(want):
            self.watcher.unwatch(uid)
        # the node netns: its nf_tables only (its routes change with every pod wired on the node)
        fresh = [uid for uid, (path, inode) in want.items()
                 if self.watcher.watch(uid, path, inode, routing=uid != NODE) == "new" and uid != NODE]
        if fresh:
            with self._dirty_lock:
                self._dirty.update(fresh)
            self._wake()

    def run(self, stopping: Callable[[], bool], serve_waiting: Callable[[], None], due: Due | None = None) -> None:
        """Re-check (and repair) the pods due (default: every pod held). The lock is taken to pick the pod
        and again to act on what was read, after making sure the pod is still the one that was read.
        serve_waiting (lock held) runs a converge step for CNI requests that arrived meanwhile."""
        with self.table.lock:
            todo = [uid for uid in self.table.pods if due is None or due.uids is None or uid in due.uids]
            polls = self._polls(todo, due)
        unread = self._unread(polls)
        for uid in todo:
            if stopping():
                return
            if uid in unread:
                continue
            with self.table.lock:
                serve_waiting()
                job = self._job(uid)
            if job is None:
                continue
            st, backend, target = job
            try:
                result: list[str] | BackendError = _read(uid, st, backend, target, due)
            except BackendError as exc:
                result = exc
            with self.table.lock:
                if self.table.pods.get(uid) is not st or st.inode != target.netns_inode:
                    continue  # removed or replaced meanwhile: its new state is checked next time
                if st.mode == SIDECAR or st.state == ENROLLED:
                    before = (st.state, st.reason)
                    self._repair(st, backend, target, result)
                    if (st.state, st.reason) != before:
                        self.table.notify()

    def _polls(self, todo: list[str], due: Due | None) -> dict[QuietPolls, list[tuple[str, RedirectSpec, bool]]]:
        """The polls of this pass that a QuietPolls backend in use may answer for (lock held): of a poll pass, the
        pods read for their polled part (never for an announced change); per backend, (uid, spec, whether
        only the unannounced part is due)."""
        polls: dict[QuietPolls, list[tuple[str, RedirectSpec, bool]]] = {}
        if due is None or due.uids is None:
            return polls
        quiet_by_name = {b.name: q for b in self.backends.in_use() if (q := quiet_polls(b)) is not None}
        if not quiet_by_name:  # no per-pod work on a node whose backends cannot answer
            return polls
        for uid in todo:
            st = self.table.pods[uid]
            if uid in due.announced or (st.mode != SIDECAR and st.state != ENROLLED):
                continue
            if (quiet := quiet_by_name.get(st.backend)) is not None:
                polls.setdefault(quiet, []).append((uid, st.spec, uid in due.partial))
        return polls

    @staticmethod
    def _unread(polls: dict[QuietPolls, list[tuple[str, RedirectSpec, bool]]]) -> set[str]:
        """The pods their backends answer for (a backend that cannot answer now answers for none)."""
        unread: set[str] = set()
        for backend, of in polls.items():
            try:
                unread |= backend.unchanged(of)
            except (BackendError, OSError) as exc:
                log.warning("cannot tell which pods are unchanged: %s", exc, extra={"step": "drift"})
        return unread

    def _job(self, uid: str) -> Job | None:
        """What the check reads for this pod (lock held); None: nothing to check."""
        st = self.table.pods.get(uid)
        if st is None or (st.mode != SIDECAR and st.state != ENROLLED):
            return None
        try:
            target = self.netns.target(st)
            backend = self.backends.of(st)
        except PinError as exc:
            if st.mode == SIDECAR:
                log.info("sidecar pod netns gone: %s", exc, extra=log_ctx(st, "drift"))
                self._remove_sidecar(uid)
            else:
                st.state, st.netns, st.inode, st.rules_in = PENDING, "", 0, False
                self.table.fail(st, f"pinned netns lost: {exc}")
            return None
        except BackendError as exc:
            self._failed(st, exc)
            return None
        return st, backend, target

    def _failed(self, st: PodState, exc: Exception) -> None:
        if st.mode == SIDECAR:
            st.state, st.reason = FAILED, f"drift repair: {exc}"
            log.warning("sidecar drift repair failed: %s", exc, extra=log_ctx(st, "drift"))
        else:
            st.rules_in = False  # not whole: the retry applies it afresh (on the fallback if the node's cannot now)
            self.table.fail(st, f"drift repair: {exc}")

    def _repair(self, st: PodState, backend: RedirectBackend, target: PodTarget,
                result: list[str] | BackendError) -> None:
        """Act on what was read: re-apply what is missing or altered. A sidecar pod (its state may be
        `failed` from an earlier repair) is `enrolled` again once intact."""
        sidecar = st.mode == SIDECAR
        try:
            if isinstance(result, BackendError):
                raise result
            if result:
                log.warning("drift found, repairing: %s", "; ".join(result), extra=log_ctx(st, "drift"))
                backend.apply(target, st.spec)
                self.table.metrics.drift_repaired()
                if sidecar and st.state != ENROLLED:
                    st.enrolled_at = time.time()
            if sidecar:
                st.state = ENROLLED
                if st.reason.startswith("drift repair"):
                    st.reason = ""
        except (BackendError, OSError) as exc:
            self._failed(st, exc)
