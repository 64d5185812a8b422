"""Sidecar pods the plugin hands to the agent (backend ebpf) are first-class like ambient pods: pinned,
recorded (mode sidecar + the traffic annotations), adopted after a restart without re-applying, repaired
by the drift check (same metric), shown in status, removed on DEL or when the pod leaves the source, and
never sent to the node proxy. Fakes only (no kernel)."""

from __future__ import annotations

from pathlib import Path

import pytest
from node_agent.backends.base import PodTarget

from cni.contract.spec import SidecarSpec
from tests.unit.test_agent_reconcile import UID, Env, pod

SIDECAR = {
    "sidecar.istio.io/status": "{}",
    "traffic.sidecar.istio.io/excludeInboundPorts": "9000",
    "unrelated.example.com/note": "x",
}


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def _add(env: Env) -> None:
    netns = env.fake_netns(UID)
    env.set({}, pod(annotations=dict(SIDECAR)))
    out = env.r.cni_sidecar_add(UID, "app", "p-1", str(netns), (), timeout=1)
    assert out.ok and out.state == "enrolled", out


def test_sidecar_add_pins_and_records(env: Env) -> None:
    _add(env)
    assert UID in env.pins.mounted
    rec = env.records.load_all()[UID]
    assert (rec.mode, rec.backend, rec.namespace, rec.name) == ("sidecar", "fake", "app", "p-1")
    assert rec.netns_inode == env.pins.mounted[UID]
    assert dict(rec.annotations) == {"traffic.sidecar.istio.io/excludeInboundPorts": "9000"}
    assert env.backend.applies == 1 and env.hub.log == []
    # a repeated ADD for the same sandbox is not a second apply
    assert env.r.cni_sidecar_add(UID, "app", "p-1", str(env.netns[UID]), (), timeout=1).ok
    assert env.backend.applies == 1 and env.backend.rules == {UID: 1}


def test_sidecar_adopted_after_restart_without_reapply(env: Env) -> None:
    _add(env)
    applies = env.backend.applies
    r2 = env.make()  # a new agent: same pins, records and backend state
    r2.adopt()
    st = r2.pods[UID]
    assert (st.mode, st.state, st.backend) == ("sidecar", "enrolled", "fake"), "not an ambient enrolment"
    assert isinstance(st.spec, SidecarSpec) and 9000 in st.spec.exclude_inbound_ports
    env.clock.t += 10
    r2.reconcile()
    assert env.backend.applies == applies and env.backend.rules == {UID: 1}
    assert env.hub.log == [], "sidecar pods are never sent to the node proxy"
    row = next(r for r in r2.status() if r["uid"] == UID)
    assert (row["mode"], row["state"], row["backend"]) == ("sidecar", "enrolled", "fake")
    assert r2.cni_check(UID).ok


def test_sidecar_drift_repaired_and_counted(env: Env) -> None:
    _add(env)
    r2 = env.make()
    r2.adopt()
    env.backend.flush(UID)  # someone detached our redirection
    env.clock.t += 10
    r2.reconcile()
    assert env.backend.rules == {UID: 1}
    assert env.repairs == 1
    env.clock.t += 10
    r2.reconcile()
    assert env.repairs == 1, "intact rules are not re-applied"


def test_sidecar_removed_on_cni_del_after_restart(env: Env) -> None:
    _add(env)
    r2 = env.make()
    r2.adopt()
    assert r2.cni_del(UID).ok
    assert env.backend.rules == {} and UID not in env.pins.mounted
    assert env.records.load_all() == {} and UID not in r2.pods
    assert all(r["uid"] != UID or r["state"] == "none" for r in r2.status())


def test_sidecar_removed_when_pod_leaves_source(env: Env) -> None:
    _add(env)
    r2 = env.make()
    r2.adopt()
    env.store.replace_pods([])
    env.clock.t += 10
    r2.reconcile()
    assert env.backend.rules == {} and UID not in env.pins.mounted and env.records.load_all() == {}


def test_sidecar_record_with_lost_netns_is_dropped(env: Env) -> None:
    _add(env)
    env.pins.mounted.clear()  # node reboot: pin gone
    r2 = env.make()
    r2.adopt()
    assert UID not in r2.pods and env.records.load_all() == {}


def test_sidecar_record_with_another_netns_pinned_is_dropped_with_its_pin(env: Env) -> None:
    _add(env)
    env.pins.mounted[UID] += 1  # the pin holds another netns than the one recorded
    r2 = env.make()
    r2.adopt()
    assert UID not in r2.pods, "the released pin is not adopted as an ambient pod"
    assert env.records.load_all() == {} and UID not in env.pins.mounted


def test_sidecar_new_sandbox_replaces_old(env: Env) -> None:
    _add(env)
    seen: list[PodTarget] = []
    orig = env.backend.apply

    def spy(target: PodTarget, spec: object) -> None:
        seen.append(target)
        orig(target, spec)

    env.backend.apply = spy  # type: ignore[method-assign]
    new = env.tmp / "ns-new"
    new.write_text("")
    assert env.r.cni_sidecar_add(UID, "app", "p-1", str(new), (), timeout=1).ok
    assert seen and seen[0].netns_inode == new.stat().st_ino
    assert env.records.load_all()[UID].netns_inode == new.stat().st_ino
    assert env.backend.rules == {UID: 1}


def test_ambient_records_unchanged(env: Env) -> None:
    from node_agent.reconcile.records import EnrolRecord

    env.records.save(EnrolRecord(UID, "app", "p-1", 7, ("10.0.0.5",), "fake"))
    raw = (env.tmp / "pods" / f"{UID}.json").read_text()
    assert '"mode": "ambient"' in raw
    assert env.records.load_all()[UID].mode == "ambient"


def test_a_sidecar_pods_record_is_written_before_its_pin(env: Env) -> None:
    """An agent killed between the two must not leave a pin without a record: a restarted agent takes such
    a pin for an ambient pod on its way in and, the pod not being ambient, removes our rules from it."""
    recorded_at_pin: list[bool] = []
    real_pin = env.pins.pin

    def pin(uid: str, source: str, expected_inode: int) -> str:
        recorded_at_pin.append(uid in env.records.load_all())
        return real_pin(uid, source, expected_inode)

    env.pins.pin = pin  # type: ignore[method-assign]
    _add(env)  # the plugin's ADD handed to the agent (reconcile/sidecar.py)
    netns = env.fake_netns("bbbbbbbb-0000-0000-0000-000000000002")
    with env.r.table.lock:  # the agent's own sidecar ADD, held after its reply (lock held)
        held = env.r.plugin_sidecars.hold(
            pod(uid="bbbbbbbb-0000-0000-0000-000000000002", annotations=dict(SIDECAR)), str(netns),
            netns.stat().st_ino, env.backend, SidecarSpec(), (), "test")
    assert held and recorded_at_pin == [True, True]


def test_a_sidecar_record_whose_pin_failed_is_not_left_behind(env: Env) -> None:
    def refuse(uid: str, source: str, expected_inode: int) -> str:
        raise OSError("no pin")

    env.pins.pin = refuse  # type: ignore[method-assign]
    netns = env.fake_netns(UID)
    with env.r.table.lock:
        assert not env.r.plugin_sidecars.hold(pod(annotations=dict(SIDECAR)), str(netns), netns.stat().st_ino,
                                              env.backend, SidecarSpec(), (), "test")
    assert UID not in env.records.load_all() and UID not in env.r.pods
