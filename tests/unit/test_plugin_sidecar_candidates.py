"""Which sidecar pods the agent looks at for a takeover in a pass (`PluginSidecars.candidates`, pure):
the pods there when it starts at once (a few per pass), a pod that appears later only after
FIRST_LOOK_DELAY (its CNI ADD, which the agent answers and holds, comes first)."""

from __future__ import annotations

from typing import Any

from node_agent.reconcile.plugin_sidecars import AFTER_DEL_DELAY, FIRST_LOOK_DELAY, PER_PASS, PluginSidecars
from node_agent.reconcile.table import PodTable
from node_agent.sources.desired import Desired

from cni.contract.kube_objects import Pod


def desired(*uids: str, mode: str = "sidecar") -> dict[str, Desired]:
    return {u: Desired(Pod(uid=u, namespace="shop", name=f"pod-{u}"), mode, "sidecar injected")  # type: ignore[arg-type]
            for u in uids}


def sidecars() -> PluginSidecars:
    nothing: Any = None
    return PluginSidecars(PodTable(nothing, nothing, nothing, lambda: 0.0), nothing, nothing)


def uids(pods: list[Pod]) -> list[str]:
    return [p.uid for p in pods]


def test_pods_there_at_start_are_looked_at_a_few_per_pass() -> None:
    ps = sidecars()
    there = desired(*(f"u{i}" for i in range(PER_PASS + 2)))
    first = uids(ps.candidates(there, 0.0))
    assert len(first) == PER_PASS
    ps._next.update({u: (100.0, 1) for u in first})  # looked at: back-off (as `look` does)
    assert uids(ps.candidates(there, 1.0)) == [f"u{PER_PASS}", f"u{PER_PASS + 1}"]


def test_a_pod_that_appears_later_waits_for_its_add() -> None:
    ps = sidecars()
    assert uids(ps.candidates(desired("a"), 0.0)) == ["a"]
    ps._next["a"] = (100.0, 1)
    later = desired("a", "b")
    assert uids(ps.candidates(later, 10.0)) == []
    assert uids(ps.candidates(later, 10.0 + FIRST_LOOK_DELAY - 0.1)) == []
    assert uids(ps.candidates(later, 10.0 + FIRST_LOOK_DELAY)) == ["b"]


def test_held_and_other_pods_are_not_looked_at() -> None:
    ps = sidecars()
    ps.table.pods["held"] = object()  # type: ignore[assignment]
    assert uids(ps.candidates({**desired("held", "s"), **desired("amb", mode="ambient")}, 0.0)) == ["s"]


def test_a_pod_let_go_at_a_del_is_not_looked_at_for_a_while() -> None:
    ps = sidecars()
    assert uids(ps.candidates(desired("a"), 0.0)) == ["a"]
    ps.deleted("a", 1.0)
    assert uids(ps.candidates(desired("a"), 2.0)) == []
    assert uids(ps.candidates(desired("a"), 1.0 + AFTER_DEL_DELAY)) == ["a"]
