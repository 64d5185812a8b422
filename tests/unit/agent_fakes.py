"""Fakes of the agent's collaborators for unit tests (no root, no kernel)."""

from __future__ import annotations

import errno
import os
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from node_agent.backends.base import BackendError, PodTarget
from node_agent.netns.pin import PinError, RecycledNetns
from node_agent.protocol.workload import WorkloadInfo
from node_agent.reconcile.state import PeerListener


class FakePins:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.mounted: dict[str, int] = {}
        self.released: list[str] = []

    def path(self, uid: str) -> Path:
        return self.directory / uid

    def inode(self, uid: str) -> int | None:
        return self.mounted.get(uid)

    def pin(self, uid: str, source: str, expected_inode: int) -> str:
        if os.stat(source).st_ino != expected_inode:
            raise RecycledNetns(errno.ESTALE, "inode mismatch")
        cur = self.mounted.get(uid)
        if cur is not None and cur != expected_inode:
            raise RecycledNetns(errno.EEXIST, "pin holds another netns")
        self.mounted[uid] = expected_inode
        return str(self.path(uid))

    def verify(self, uid: str, expected_inode: int) -> str:
        got = self.mounted.get(uid)
        if got is None:
            raise PinError(errno.ENOENT, f"no netns pinned for pod {uid}")
        if got != expected_inode:
            raise RecycledNetns(errno.ESTALE, "recycled")
        return str(self.path(uid))

    def release(self, uid: str) -> None:
        self.mounted.pop(uid, None)
        self.released.append(uid)

    def pinned(self) -> dict[str, int]:
        return dict(self.mounted)

    def leftovers(self) -> list[str]:
        return []


class FakeBackend:
    """A RedirectBackend that keeps rule sets in a dict (needs no cgroup, declines nothing, pins nothing)."""

    name = "fake"
    needs_cgroup = False
    change_events = False

    def __init__(self) -> None:
        self.rules: dict[str, int] = {}  # uid -> number of rule sets (must never exceed 1)
        self.applies = 0
        self.targets: list[PodTarget] = []  # as each apply got them
        self.removes = 0
        self.fail_apply = False
        self.lock = threading.Lock()

    def apply(self, target: PodTarget, spec: object) -> None:
        with self.lock:
            if self.fail_apply:
                raise BackendError("injected apply failure")
            assert target.netns_path and target.netns_inode
            self.applies += 1
            self.targets.append(target)
            self.rules[target.uid] = 1

    def remove(self, target: PodTarget) -> None:
        with self.lock:
            self.removes += 1
            self.rules.pop(target.uid, None)

    def check(self, target: PodTarget, spec: object) -> list[str]:
        with self.lock:
            return [] if self.rules.get(target.uid) == 1 else ["chain missing"]

    def installed(self, target: PodTarget) -> bool:
        return target.uid in self.rules

    def flush(self, uid: str) -> None:
        with self.lock:
            self.rules.pop(uid, None)

    def fallback_reason(self, spec: object) -> str | None:
        return None

    def set_proxy_cgroup(self, path: str | Path | None) -> None:
        pass

    def pinned_pods(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


class FakeHub:
    """The node-proxy hub: acks at once (auto_ack) or when told, nacks the next upsert when asked."""

    def __init__(self, auto_ack: bool = True) -> None:
        self.auto_ack = auto_ack
        self.desired: dict[str, WorkloadInfo] = {}
        self.pending: list[tuple[str, Future[None]]] = []
        self.log: list[tuple[str, str]] = []
        self.connected = True
        self.nack_next = ""
        self.listeners: list[PeerListener] = []
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def status(self) -> dict[str, Any]:
        return {"connected": self.connected, "snapshot_acked": self.connected, "workloads": len(self.desired)}

    def add_peer_listener(self, listener: PeerListener) -> None:
        self.listeners.append(listener)

    def upsert(self, w: WorkloadInfo) -> Future[None]:
        self.desired[w.uid] = w
        self.log.append(("add", w.uid))
        fut: Future[None] = Future()
        if self.nack_next:
            fut.set_exception(RuntimeError(self.nack_next))
            self.nack_next = ""
        elif self.auto_ack:
            fut.set_result(None)
        else:
            self.pending.append((w.uid, fut))
        return fut

    def remove(self, uid: str) -> Future[None]:
        self.desired.pop(uid, None)
        self.log.append(("delete", uid))
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def ack_all(self) -> None:
        pending, self.pending = self.pending, []
        for _, fut in pending:
            fut.set_result(None)
