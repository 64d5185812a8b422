"""The `headrace status` rows: every pod held (ambient or sidecar) and every other pod of the source with
its mode and why, sorted by namespace, name and uid.

The reconciler publishes the rows as an immutable snapshot whenever its state changes (`StatusBoard`), so
a status request never waits for the reconcile lock, whatever the load; the node proxy's session state
is added per ambient pod when the request is answered (`with_proxy`): an enrolled pod whose proxy is
gone shows `enrolled, proxy disconnected` (its redirected traffic has no listener). An eBPF pod whose parent
cgroups hold a program that can override the redirect carries it in its reason (`with_alerts`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from node_agent.backends.ebpf.parent_alerts import ALERTS
from node_agent.reconcile.state import AMBIENT, ENROLLED, NONE, PodState, shown_state
from node_agent.sources.desired import Desired


def pod_row(st: PodState, node_backend: str) -> dict[str, Any]:
    ambient = st.mode == AMBIENT
    reason = st.reason if ambient else (st.reason or "redirected by the agent")
    fallback = bool(not reason and st.fallback_reason and st.backend and st.backend != node_backend)
    row = {
        "namespace": st.namespace, "name": st.name, "uid": st.uid, "mode": st.mode,
        "backend": (st.backend or node_backend) if ambient else st.backend, "state": shown_state(st),
        "reason": f"on the {st.backend} fallback: {st.fallback_reason}" if fallback else reason,
        "netns": st.netns, "ips": list(st.ips),
        "enrolled_at": round(st.enrolled_at, 3) if st.state == ENROLLED else None,
    }
    if fallback:  # why not the node's backend (shown beside the state)
        row["fallback"] = True
    return row


def other_row(uid: str, d: Desired) -> dict[str, Any]:
    return {
        "namespace": d.pod.namespace, "name": d.pod.name, "uid": uid, "mode": d.mode,
        "backend": "", "state": NONE, "reason": d.reason, "netns": "", "ips": list(d.pod.ips),
    }


CONNECTED, DISCONNECTED, SYNCING = "connected", "disconnected", "syncing"


def proxy_state(hub_status: Mapping[str, Any]) -> str:
    """The node proxy's session as ambient pods see it: connected (snapshot acked), syncing (session open,
    snapshot not acked yet) or disconnected."""
    if not hub_status.get("connected"):
        return DISCONNECTED
    # one hub, or several transports (gRPC's at the top level, the others' under their names)
    sessions = [hub_status, *(v for v in hub_status.values() if isinstance(v, Mapping))]
    return CONNECTED if any(s.get("connected") and s.get("snapshot_acked") for s in sessions) else SYNCING


def with_proxy(rows: list[dict[str, Any]], proxy: str) -> list[dict[str, Any]]:
    """Rows with the `proxy` column for ambient pods (copies; the published rows stay as they are)."""
    return [{**r, "proxy": proxy} if r.get("mode") == AMBIENT and r.get("state") != NONE else r for r in rows]


class StatusBoard:
    """The latest published status rows; reading never blocks on the reconciler."""

    def __init__(self) -> None:
        self._rows: tuple[dict[str, Any], ...] = ()
        self._lock = threading.Lock()  # only orders publishers; readers take the reference as it is
        self.enrolled_ambient = 0
        self._listeners: list[Callable[[], None]] = []
        self._made = StatusRows()

    def update(self, held: Iterable[PodState], others: Mapping[str, Desired], node_backend: str) -> None:
        """Publish the rows of this state if one differs from the last published (the reconciler's lock held)."""
        rows = self._made.update(held, others, node_backend)
        if rows is not None:
            self.publish(rows)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call listener() after every publish (from the publisher's thread: it must be quick)."""
        self._listeners.append(listener)

    def publish(self, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            self._rows = tuple(rows)
            self.enrolled_ambient = sum(1 for r in rows if r["mode"] == AMBIENT and r["state"] == ENROLLED)
        for listener in self._listeners:
            listener()

    def rows(self) -> list[dict[str, Any]]:
        return [with_alerts(dict(r)) for r in self._rows]


def with_alerts(row: dict[str, Any]) -> dict[str, Any]:
    """A held pod's row with what the eBPF drift check found on its parent cgroups (read when asked: the
    findings change without a reconcile) as `alerts` and in its reason."""
    found = ALERTS.of(row["uid"]) if row.get("state") != NONE else ()
    if found:
        row["alerts"] = list(found)
        row["reason"] = "; ".join(x for x in (row.get("reason") or "", *found) if x)
    return row


Cached = tuple[tuple[Any, ...], dict[str, Any]]  # what a row was made from, the row


class StatusRows:
    """The rows, rebuilt only for the pods whose row would differ since the last update (the reconciler
    publishes at every pass: with many pods, building every row each time was most of an idle agent's
    work). The rows are shared between snapshots: never changed once made."""

    def __init__(self) -> None:
        self._held: dict[str, Cached] = {}
        self._others: dict[str, Cached] = {}
        self._answered = False

    def update(self, held: Iterable[PodState], others: Mapping[str, Desired],
               node_backend: str) -> list[dict[str, Any]] | None:
        """The rows sorted by namespace, name and uid; None when they are the last update's."""
        changed = not self._answered
        new_held: dict[str, Cached] = {}
        for st in held:
            key: tuple[Any, ...] = (st.namespace, st.name, st.mode, st.backend, st.state, st.moving_from, st.reason,
                   st.fallback_reason, st.netns, st.ips, st.enrolled_at, node_backend)
            last = self._held.get(st.uid)
            if last is None or last[0] != key:
                last, changed = (key, pod_row(st, node_backend)), True
            new_held[st.uid] = last
        new_others: dict[str, Cached] = {}
        for uid, d in others.items():
            if uid in new_held:
                continue
            key = (d.pod.namespace, d.pod.name, d.mode, d.reason, d.pod.ips)
            last = self._others.get(uid)
            if last is None or last[0] != key:
                last, changed = (key, other_row(uid, d)), True
            new_others[uid] = last
        if not changed and len(new_held) == len(self._held) and len(new_others) == len(self._others):
            return None
        self._held, self._others, self._answered = new_held, new_others, True
        rows = [row for _, row in (*new_held.values(), *new_others.values())]
        rows.sort(key=lambda r: (r["namespace"], r["name"], r["uid"]))
        return rows
