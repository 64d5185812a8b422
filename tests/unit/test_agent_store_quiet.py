"""The pod store's quiet changes: a pod that differs only in the redirection annotation (what the agent
writes back itself) does not wake the reconciler's kind of listener; any other change does."""

from __future__ import annotations

from node_agent.sources.store import PodStore, quiet_change

from cni.contract.kube_objects import Pod

MARK = {"ambient.istio.io/redirection": "enabled"}


def pod(**kw: object) -> Pod:
    fields: dict[str, object] = {"uid": "u1", "namespace": "app", "name": "p1", "ips": ("10.0.0.2",)}
    fields.update(kw)
    return Pod(**fields)  # type: ignore[arg-type]


def test_quiet_change() -> None:
    assert quiet_change(pod(), pod(annotations=MARK))
    assert quiet_change(pod(annotations={**MARK, "a": "1"}), pod(annotations={"a": "1"}))
    assert not quiet_change(pod(), pod(annotations={"a": "1"}))
    assert not quiet_change(pod(), pod(labels={"istio.io/dataplane-mode": "ambient"}, annotations=MARK))
    assert not quiet_change(pod(), pod(ips=("10.0.0.3",)))


def test_listeners() -> None:
    store = PodStore()
    loud: list[int] = []
    every: list[int] = []
    store.subscribe(lambda: loud.append(1))
    store.subscribe(lambda: every.append(1), quiet=True)
    store.replace_pods([pod()])
    assert (len(loud), len(every)) == (1, 1)
    store.upsert_pod(pod(annotations=MARK))
    store.replace_pods([pod()])
    assert (len(loud), len(every)) == (1, 3)
    store.upsert_pod(pod(labels={"a": "b"}))
    store.replace_pods([pod(labels={"a": "b"}), pod(uid="u2", name="p2")])
    assert (len(loud), len(every)) == (3, 5)
