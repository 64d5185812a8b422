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


def status_rows(held: Iterable[PodState], others: Mapping[str, Desired], node_backend: str) -> list[dict[str, Any]]:
    rows = [pod_row(st, node_backend) for st in held]
    seen = {r["uid"] for r in rows}
    rows += [other_row(uid, d) for uid, d in others.items() if uid not in seen]
    rows.sort(key=lambda r: (r["namespace"], r["name"], r["uid"]))
    return rows
