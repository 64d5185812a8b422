"""The status rows are rebuilt only when one would differ: an idle pass publishes nothing."""

from __future__ import annotations

from node_agent.reconcile.state import ENROLLED, PENDING, PodState
from node_agent.reconcile.status import StatusRows
from node_agent.sources.desired import Desired

from cni.contract.kube_objects import Pod
from cni.contract.spec import AmbientSpec, SidecarSpec


def held(uid: str, name: str) -> PodState:
    return PodState(uid, "app", name, "ambient", AmbientSpec(), state=ENROLLED, backend="nftables",
                    ips=("10.0.0.2",), enrolled_at=1.0)


def test_nothing_changed_nothing_rebuilt_and_each_change_shows() -> None:
    rows = StatusRows()
    a, b = held("a", "web"), held("b", "api")
    others = {"c": Desired(Pod(uid="c", namespace="app", name="db"), "none", "no label")}
    first = rows.update([a, b], others, "nftables")
    assert first is not None and [r["name"] for r in first] == ["api", "db", "web"]
    assert rows.update([a, b], dict(others), "nftables") is None  # an idle pass: nothing to publish
    a.state = PENDING
    second = rows.update([a, b], others, "nftables")
    assert second is not None and [r["state"] for r in second] == [ENROLLED, "none", PENDING]
    assert second[0] is first[0]  # an unchanged pod's row is the one already made
    assert rows.update([a, b], others, "nftables") is None
    gone = rows.update([a], others, "nftables")  # a pod left the table
    assert gone is not None and [r["name"] for r in gone] == ["db", "web"]
    moved = rows.update([a], {"c": Desired(Pod(uid="c", namespace="app", name="db"), "sidecar", "sidecar injected")},
                        "nftables")
    assert moved is not None and moved[0]["mode"] == "sidecar"
    swapped = rows.update([held("d", "web")], {}, "nftables")  # as many pods, another one
    assert swapped is not None and [r["uid"] for r in swapped] == ["d"]


def test_a_pod_held_and_in_the_source_shows_once_and_the_node_backend_is_part_of_a_row() -> None:
    rows = StatusRows()
    sc = PodState("s", "app", "side", "sidecar", SidecarSpec(), state=ENROLLED)
    out = rows.update([sc], {"s": Desired(Pod(uid="s", namespace="app", name="side"), "sidecar", "x")}, "iptables")
    assert out is not None and len(out) == 1 and out[0]["reason"] == "redirected by the agent"
    a = held("a", "web")
    a.backend = ""
    assert rows.update([sc, a], {}, "iptables") is not None
    again = rows.update([sc, a], {}, "ebpf")  # the node's backend changed: an ambient row without one shows it
    assert again is not None and [r["backend"] for r in again] == ["", "ebpf"]
