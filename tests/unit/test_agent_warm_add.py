"""The agent's side of the one-request ADD (serve/warm_add.py) on the reconciler with fakes (no kernel):
the mode from the pod cache (a lookup on a miss), a sidecar pod applied and held like a plugin-redirected
one (pinned, recorded, drift watched, removed by DEL), ambient and eBPF sidecar pods handed to the existing
handlers after an interim line, and every case left to the plugin's standalone path."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from node_agent.backends.base import RedirectBackend
from node_agent.backends.ebpf import pod_cgroup
from node_agent.serve.add_request import WarmAddRequest
from node_agent.serve.warm_add import AGENT_REASON, WarmAdd

from cni.contract.kube_objects import Namespace, Pod
from tests.unit.test_agent_reconcile import UID, Env, pod

SIDECAR = {"sidecar.istio.io/status": "{}"}


class Named:
    """The backends by name: the fake one stands for the plugin's nftables backend."""

    def __init__(self, backend: RedirectBackend, name: str = "nftables") -> None:
        self.backend = backend
        self.name = name

    def named(self, name: str) -> RedirectBackend | None:
        return self.backend if name == self.name else None


class Setup:
    def __init__(self, env: Env, lookup: Any = None) -> None:
        self.env = env
        self.interims: list[dict[str, Any]] = []
        self.lookups: list[tuple[str, str]] = []
        self.lookup_answer: tuple[Pod | None, Namespace | None] = (None, None)

        def look(namespace: str, name: str) -> tuple[Pod | None, Namespace | None]:
            self.lookups.append((namespace, name))
            return self.lookup_answer

        r = env.r
        self.warm = WarmAdd(env.store, r, r.table, Named(env.backend), r.plugin_sidecars,
                            lookup=look if lookup is None else lookup, add_timeout=1)

    def request(self, *, uid: str = UID, name: str = "p-1", backend: str = "nftables",
                excluded: tuple[str, ...] = ("kube-system",)) -> WarmAddRequest:
        netns = self.env.netns.get(uid) or self.env.fake_netns(uid)
        return WarmAddRequest(uid, "app", name, str(netns), ("10.0.0.5",), backend, "auto", excluded, "c1")

    def add(self, req: WarmAddRequest) -> dict[str, Any]:
        return self.warm.add(req, self.interims.append)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def test_non_mesh_pod_answered_from_the_cache(env: Env) -> None:
    s = Setup(env)
    env.set({}, pod())
    assert s.add(s.request()) == {"v": 2, "ok": True, "mode": "none", "reason": "not in the mesh (agent's pod cache)"}
    assert s.lookups == [] and s.interims == [] and env.backend.applies == 0


def test_excluded_namespace_of_the_plugin_decides(env: Env) -> None:
    s = Setup(env)
    env.set({}, pod(annotations=dict(SIDECAR)))
    assert s.add(s.request(excluded=("app",)))["mode"] == "none"


def test_sidecar_pod_applied_and_held(env: Env) -> None:
    s = Setup(env)
    env.set({}, pod(annotations=dict(SIDECAR)))
    reply = s.add(s.request())
    assert reply == {"v": 2, "ok": True, "mode": "sidecar", "state": "enrolled", "backend": "fake"}
    assert env.backend.applies == 1 and s.interims == []
    st = env.r.pods[UID]
    assert (st.mode, st.state, st.reason, st.rules_in) == ("sidecar", "enrolled", AGENT_REASON, True)
    assert UID in env.pins.mounted and env.records.load_all()[UID].mode == "sidecar"
    # drift watched like any held pod: flushed rules are put back by a pass
    env.backend.flush(UID)
    env.clock.t += 10
    env.r.reconcile()
    assert env.backend.rules == {UID: 1}
    # DEL: the agent lets go (rules out, pin released, record gone)
    assert env.r.cni_del(UID).ok
    assert UID not in env.r.pods and UID not in env.pins.mounted and env.backend.rules == {}


def test_the_hold_comes_after_the_reply_and_a_del_waits_for_it(env: Env) -> None:
    s = Setup(env)
    env.set({}, pod(annotations=dict(SIDECAR)))
    after: list[Callable[[], None]] = []
    assert s.warm.add(s.request(), s.interims.append, after.append)["state"] == "enrolled"
    assert env.backend.applies == 1 and UID not in env.r.pods and len(after) == 1  # the reply first
    deleted: list[bool] = []
    deleting = threading.Thread(target=lambda: deleted.append(env.r.cni_del(UID).ok))
    deleting.start()
    time.sleep(0.2)
    assert deleted == []  # the DEL waits for the promised hold
    after[0]()
    deleting.join(5)
    assert deleted == [True] and UID not in env.r.pods and UID not in env.pins.mounted and env.backend.rules == {}


def test_a_pod_the_agent_holds_already_is_left_to_the_plugin(env: Env) -> None:
    s = Setup(env)
    env.set({}, pod(annotations=dict(SIDECAR)))
    assert s.add(s.request())["ok"]
    reply = s.add(s.request())
    assert reply["standalone"] is True and "holds this pod already" in reply["error"]


def test_cache_miss_is_looked_up(env: Env) -> None:
    s = Setup(env)
    env.set({})
    s.lookup_answer = (pod(annotations=dict(SIDECAR)), Namespace("app"))
    assert s.add(s.request())["mode"] == "sidecar"
    assert s.lookups == [("app", "p-1")]


def test_stale_uid_in_the_cache_is_looked_up_then_left_to_the_plugin(env: Env) -> None:
    s = Setup(env)
    env.set({}, pod(uid="aaaaaaaa-0000-0000-0000-00000000000f", name="p-1", annotations=dict(SIDECAR)))
    reply = s.add(s.request())
    assert reply["standalone"] is True and s.lookups == [("app", "p-1")]


@pytest.mark.parametrize("lookup", [False, True])
def test_unknown_pod_is_left_to_the_plugin(env: Env, lookup: bool) -> None:
    s = Setup(env, lookup=None if lookup else False)
    if not lookup:
        s.warm.lookup = None
    env.set({})
    reply = s.add(s.request())
    assert reply == {"v": 2, "ok": False, "standalone": True, "error": "pod not in the agent's pod source"}


def test_failing_lookup_is_left_to_the_plugin(env: Env) -> None:
    def broken(namespace: str, name: str) -> tuple[Pod | None, Namespace | None]:
        raise OSError("apiserver down")

    s = Setup(env, lookup=broken)
    env.set({})
    assert s.add(s.request())["standalone"] is True


def test_other_backend_is_left_to_the_plugin(env: Env) -> None:
    s = Setup(env)
    env.set({}, pod(annotations=dict(SIDECAR)))
    reply = s.add(s.request(backend="iptables"))
    assert reply["standalone"] is True and "no iptables backend" in reply["error"] and env.backend.applies == 0


def test_bad_annotation_is_refused_with_its_cni_code(env: Env) -> None:
    s = Setup(env)
    env.set({}, pod(annotations={**SIDECAR, "traffic.sidecar.istio.io/excludeInboundPorts": "80,x"}))
    reply = s.add(s.request())
    assert reply["ok"] is False and reply["code"] == 101 and reply["retry"] is False
    assert env.backend.applies == 0 and UID not in env.r.pods


def test_apply_failure_is_answered_for_the_plugin_to_retry(env: Env) -> None:
    s = Setup(env)
    env.set({}, pod(annotations=dict(SIDECAR)))
    env.backend.fail_apply = True
    reply = s.add(s.request())
    assert reply["ok"] is False and reply["retry"] is True and "injected apply failure" in reply["error"]
    assert UID not in env.r.pods


def test_ambient_pod_goes_to_the_enrolment_after_an_interim_line(env: Env) -> None:
    s = Setup(env)
    env.set({"istio.io/dataplane-mode": "ambient"}, pod())
    env.r.start()
    try:
        reply = s.add(s.request())
    finally:
        env.r.stop()
    assert s.interims == [{"v": 2, "ok": True, "mode": "ambient", "interim": True}]
    assert reply["mode"] == "ambient"


def test_ebpf_sidecar_goes_to_the_sidecar_handler(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """No kubelet cgroup directory of the pod: the held path, which also looks for its processes."""
    monkeypatch.setenv(pod_cgroup.ROOTS_ENV, str(env.tmp / "no-kubelet-cgroups"))
    s = Setup(env)
    s.warm.backends = Named(env.backend, "ebpf")
    env.set({}, pod(annotations=dict(SIDECAR)))
    reply = s.add(s.request(backend="ebpf"))
    assert s.interims == [{"v": 2, "ok": True, "mode": "sidecar", "interim": True}]
    assert reply == {"v": 2, "ok": True, "mode": "sidecar", "state": "enrolled"}
    assert env.r.pods[UID].reason != AGENT_REASON  # held by the eBPF sidecar path


def kubelet_cgroup(env: Env, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The pod-level cgroup directory the kubelet makes before the sandbox (cgroupfs driver, Guaranteed)."""
    root = env.tmp / "cgroup-root"
    monkeypatch.setenv(pod_cgroup.ROOTS_ENV, str(root))
    made = root / "kubepods" / f"pod{UID}"
    made.mkdir(parents=True)
    return made


def test_ebpf_sidecar_with_its_kubelet_cgroup_is_applied_here_and_held_after(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    cgroup = kubelet_cgroup(env, monkeypatch)
    s = Setup(env)
    s.warm.backends = Named(env.backend, "ebpf")
    env.set({}, pod(annotations=dict(SIDECAR)))
    after: list[Callable[[], None]] = []
    reply = s.warm.add(s.request(backend="ebpf"), s.interims.append, after.append)
    assert reply == {"v": 2, "ok": True, "mode": "sidecar", "state": "enrolled", "backend": "fake"}
    assert s.interims == [] and env.backend.applies == 1 and UID not in env.r.pods  # the reply first
    assert env.backend.targets[-1].cgroup_path == str(cgroup)
    after[0]()
    st = env.r.pods[UID]
    assert (st.reason, st.cgroup_path) == (AGENT_REASON, str(cgroup))
    assert env.r.cni_del(UID).ok and env.backend.rules == {}


def test_ebpf_sidecar_the_ebpf_backend_declines_goes_to_the_held_path(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    kubelet_cgroup(env, monkeypatch)
    s = Setup(env)
    s.warm.backends = Named(env.backend, "ebpf")
    monkeypatch.setattr(env.backend, "fallback_reason", lambda spec: "interceptionMode TPROXY is not in eBPF")
    env.set({}, pod(annotations=dict(SIDECAR)))
    s.add(s.request(backend="ebpf"))
    assert s.interims == [{"v": 2, "ok": True, "mode": "sidecar", "interim": True}]


def test_bad_annotation_on_ebpf_is_refused_before_the_hand_off(env: Env) -> None:
    s = Setup(env)
    s.warm.backends = Named(env.backend, "ebpf")
    env.set({}, pod(annotations={**SIDECAR, "traffic.sidecar.istio.io/excludeInboundPorts": "80,x"}))
    reply = s.add(s.request(backend="ebpf"))
    assert reply["code"] == 101 and s.interims == [] and UID not in env.r.pods


def test_a_del_learns_that_the_agent_removed_the_rules_the_plugin_would_remove(env: Env) -> None:
    """The plugin's DEL says which rules it would remove: the agent removes those of a pod it holds on that
    backend and says so (the plugin then removes nothing); for a DEL naming another backend (or none) the
    answer is the plain "removed" and the plugin removes its own."""
    env.backend.name = "nftables"  # the fake stands for the nftables backend
    s = Setup(env)
    env.set({}, pod(annotations=dict(SIDECAR)))
    assert s.add(s.request())["state"] == "enrolled"
    out = env.r.cni_del(UID, ("nftables", "auto"))
    assert (out.ok, out.state) == (True, "rules-removed") and env.backend.rules == {}
    assert UID not in env.r.pods and UID not in env.pins.mounted and UID not in env.records.load_all()
    assert s.add(s.request())["state"] == "enrolled"
    assert env.r.cni_del(UID, ("iptables", "auto")).state == "removed" and env.backend.rules == {}
    assert env.r.cni_del(UID, ("nftables", "auto")).state == "removed"  # not held (any more)
