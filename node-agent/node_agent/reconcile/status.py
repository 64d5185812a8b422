"""The `headrace status` rows: every pod held (ambient or sidecar) and every other pod of the source with
its mode and why, sorted by namespace, name and uid."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from node_agent.reconcile.state import AMBIENT, ENROLLED, NONE, PodState
from node_agent.sources.desired import Desired


def pod_row(st: PodState, node_backend: str) -> dict[str, Any]:
    ambient = st.mode == AMBIENT
    return {
        "namespace": st.namespace, "name": st.name, "uid": st.uid, "mode": st.mode,
        "backend": (st.backend or node_backend) if ambient else st.backend, "state": st.state,
        "reason": st.reason if ambient else (st.reason or "redirected by the agent"),
        "netns": st.netns, "ips": list(st.ips),
        "enrolled_at": round(st.enrolled_at, 3) if st.state == ENROLLED else None,
    }


def other_row(uid: str, d: Desired) -> dict[str, Any]:
    return {
        "namespace": d.pod.namespace, "name": d.pod.name, "uid": uid, "mode": d.mode,
        "backend": "", "state": NONE, "reason": d.reason, "netns": "", "ips": list(d.pod.ips),
    }


def status_rows(held: Iterable[PodState], others: Mapping[str, Desired], node_backend: str) -> list[dict[str, Any]]:
    rows = [pod_row(st, node_backend) for st in held]
    seen = {r["uid"] for r in rows}
    rows += [other_row(uid, d) for uid, d in others.items() if uid not in seen]
    rows.sort(key=lambda r: (r["namespace"], r["name"], r["uid"]))
    return rows
