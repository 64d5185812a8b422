"""The reconcile loop with fake pins, backend and proxy hub: ordering, adoption, drift, failure paths."""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import pytest
from node_agent.backends.base import PodTarget
from node_agent.netns.finder import NetnsLocation, NetnsNotFound
from node_agent.reconcile import enrol
from node_agent.reconcile.loop import Reconciler
from node_agent.reconcile.records import EnrolRecord, RecordStore
from node_agent.reconcile.state import CniHint, same_ips
from node_agent.sources.store import PodStore

from cni.contract.kube_objects import Namespace, Pod
from tests.unit import agent_fakes
from tests.unit.agent_fakes import FakeBackend, FakeHub, FakePins

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
UID = "aaaaaaaa-0000-0000-0000-000000000001"
UID2 = "aaaaaaaa-0000-0000-0000-000000000002"


class Clock:
    """Still until moved (t), or the real monotonic clock once `real` (tests that run the loop thread)."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.real = False

    def __call__(self) -> float:
        return time.monotonic() if self.real else self.t


class FakeConntrack:
    def __init__(self) -> None:
        self.values: dict[str, int] = {}

    def read_loose(self, netns_path: str) -> int | None:
        return self.values.get(netns_path, 1)

    def set_loose(self, netns_path: str, value: int) -> None:
        self.values[netns_path] = value

    def read_loose_here(self) -> int | None:  # the fake backends apply from outside: never asked
        raise AssertionError("no fake backend applies inside the netns")

    def set_loose_here(self, value: int) -> None:
        raise AssertionError("no fake backend applies inside the netns")


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = PodStore()
        self.backend = FakeBackend()
        self.hub = FakeHub()
        self.pins = FakePins(tmp / "netns")
        self.records = RecordStore(tmp / "pods")
        self.clock = Clock()
        self.netns: dict[str, Path] = {}
        self.node_rules: list[list[str]] = []
        self.repairs = 0
        self.failures: list[str] = []  # the reasons counted as enrolment failures (metrics)
        self.ct = FakeConntrack()
        self.ips_in_netns: tuple[str, ...] = ("10.9.9.9",)  # what the pod's netns shows (no CNI ADD yet)
        self.r = self.make()

    def make(self) -> Reconciler:
        env = self

        class M:
            def enrolled(self) -> None: ...
            def failed(self, reason: str) -> None:
                env.failures.append(reason)
            def drift_repaired(self) -> None:
                env.repairs += 1

            def reconcile_took(self, seconds: float) -> None: ...
            def pod_states(self, counts) -> None: ...

        return Reconciler(
            self.store,
            self.backend,
            self.hub,
            self.pins,
            self.records,
            scan=lambda: self.scan(),
            read_ips=lambda path: self.ips_in_netns,
            find_by_ips=self.by_ips,
            conntrack=self.ct,
            node_rules=self.node_rules.append,
            metrics=M(),
            clock=self.clock,
            drift_interval=2.0,
        )

    def fake_netns(self, uid: str) -> Path:
        path = self.tmp / f"ns-{uid}"
        path.write_text("")
        self.netns[uid] = path
        return path

    def scan(self) -> dict[str, list[NetnsLocation]]:
        return {uid: [NetnsLocation(uid, 100, str(p), os.stat(p).st_ino)] for uid, p in self.netns.items()}

    def by_ips(self, uid: str, ips: tuple[str, ...]) -> NetnsLocation:
        raise NetnsNotFound(f"no named netns holds {ips}")

    def set(self, ns_labels: dict[str, str], *pods: Pod) -> None:
        self.store.replace_namespaces([Namespace("app", ns_labels), Namespace("kube-system", AMBIENT)])
        self.store.replace_pods(pods)

    def state(self, uid: str) -> str:
        return self.r.pods[uid].state if uid in self.r.pods else "absent"


def pod(uid: str = UID, **kw) -> Pod:
    return Pod(
        uid=uid,
        namespace=kw.pop("namespace", "app"),
        name=kw.pop("name", "p-" + uid[-1]),
        ips=kw.pop("ips", ("10.0.0.5",)),
        **kw,
    )


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def test_label_enrols_running_pod_proxy_first_then_rules(env: Env) -> None:
    env.hub.auto_ack = False
    env.fake_netns(UID)
    env.set({}, pod())
    env.r.reconcile()
    assert env.state(UID) == "none" or UID not in env.r.pods
    assert env.backend.rules == {}
    env.set(AMBIENT, pod())
    env.r.reconcile()
    assert env.state(UID) == "pending"
    assert env.hub.desired[UID].netns_path == str(env.pins.path(UID))
    assert env.hub.desired[UID].netns_inode == os.stat(env.netns[UID]).st_ino
    assert env.backend.rules == {}, "rules must wait for the proxy's ack"
    env.hub.ack_all()
    env.r.reconcile()
    assert env.state(UID) == "enrolled"
    assert env.backend.rules == {UID: 1}
    assert env.node_rules[-1] == ["10.0.0.5"]
    assert env.records.load_all()[UID].netns_inode == os.stat(env.netns[UID]).st_ino
    assert env.records.load_all()[UID].tcp_loose == 1
    assert env.ct.values[str(env.pins.path(UID))] == 0, "pre-existing connections are protected"


def test_conntrack_guard_refused_warns_naming_the_sysctl_and_the_cost(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """/proc/sys read-only (the agent's container not privileged): the pod still enrols, and the warning
    names the sysctl and what its absence costs."""

    def refused(netns_path: str, value: int) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    env.ct.set_loose = refused  # type: ignore[method-assign]
    env.fake_netns(UID)
    env.set(AMBIENT, pod())
    with caplog.at_level(logging.WARNING, logger="headrace.agent.reconcile"):
        for _ in range(3):
            env.r.reconcile()
    assert env.state(UID) == "enrolled"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    assert "nf_conntrack_tcp_loose" in warned[0] and "Read-only file system" in warned[0]
    assert "opened before enrolment may be reset" in warned[0]
    env.set({}, pod())  # the label removed: the restore is refused the same way, the removal goes on
    with caplog.at_level(logging.WARNING, logger="headrace.agent.reconcile"):
        env.r.reconcile()
    assert UID not in env.r.pods and env.hub.log[-1] == ("delete", UID) and env.records.load_all() == {}
    assert any("cannot restore nf_conntrack_tcp_loose" in r.getMessage() for r in caplog.records)


class CountedFuture(Future[None]):
    """A proxy ack that counts how often it is asked whether it is done."""

    asked = 0

    def done(self) -> bool:
        CountedFuture.asked += 1
        return super().done()


def test_a_wave_is_followed_by_what_ended_not_by_asking_every_pod(env: Env, monkeypatch) -> None:
    """Between pods of a pass and while it waits, the loop looks at the proxy acks and applies that ended
    since it last looked, never at every pod sent or every job: a wave of N pods costs N looks, not N²."""
    monkeypatch.setattr(agent_fakes, "Future", CountedFuture)
    env.hub.auto_ack = False
    uids = [f"aaaaaaaa-0000-0000-0000-{i:012d}" for i in range(1, 41)]
    for uid in uids:
        env.fake_netns(uid)
    env.set(AMBIENT, *(pod(uid) for uid in uids))
    env.r.reconcile()
    assert len(env.hub.pending) == len(uids) and not env.backend.rules
    first_uid, first = env.hub.pending.pop(0)
    first.set_result(None)
    CountedFuture.asked = 0
    with env.r.table.lock:
        env.r.enrolment.step_jobs()  # the one ack: its apply starts
        assert first_uid in env.r.enrolment.jobs
        env.r.enrolment.step_jobs()  # nothing ended since
    assert CountedFuture.asked <= 2, "the pods still waiting for their ack were asked"
    env.hub.ack_all()
    env.r.reconcile()
    assert {env.state(uid) for uid in uids} == {"enrolled"} and set(env.backend.rules) == set(uids)


class HeldBackend(FakeBackend):
    """Its applies wait until `go` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.started, self.go = threading.Event(), threading.Event()

    def apply(self, target: PodTarget, spec: object) -> None:
        self.started.set()
        assert self.go.wait(10)
        super().apply(target, spec)


def test_a_pass_waiting_for_its_applies_goes_on_as_soon_as_one_ends(env: Env, monkeypatch) -> None:
    """The pass that started applies waits for them with the lock free (CNI requests served meanwhile); an
    apply that ends wakes it at once, so the pod is enrolled (and an ADD waiting for it answered) then,
    not at the pass's next look (JOB_POLL, made long here)."""
    monkeypatch.setattr(enrol, "JOB_POLL", 5.0)
    env.backend = HeldBackend()
    env.r = env.make()
    env.fake_netns(UID)
    env.set(AMBIENT, pod())
    running = threading.Thread(target=env.r.reconcile)
    running.start()
    assert env.backend.started.wait(5)
    time.sleep(0.1)  # the pass waits in finish_jobs
    ended = time.monotonic()
    env.backend.go.set()
    running.join(10)
    assert time.monotonic() - ended < 1.0, "the pass waited for its next look"
    assert env.state(UID) == "enrolled"


def test_unlabel_removes_rules_then_tells_proxy_then_releases_pin(env: Env) -> None:
    env.fake_netns(UID)
    env.set(AMBIENT, pod())
    env.r.reconcile()
    env.r.reconcile()
    assert env.state(UID) == "enrolled"
    env.set({}, pod())
    env.r.reconcile()
    assert UID not in env.r.pods
    assert env.backend.rules == {}
    assert env.hub.log[-1] == ("delete", UID)
    assert UID in env.pins.released and env.pins.inode(UID) is None
    assert env.ct.values[str(env.pins.path(UID))] == 1, "conntrack setting restored"
    assert env.records.load_all() == {}
    assert env.r.status()[0]["mode"] == "none"


def test_deleted_pod_is_cleaned(env: Env) -> None:
    env.fake_netns(UID)
    env.set(AMBIENT, pod())
    env.r.reconcile()
    env.set(AMBIENT)
    env.r.reconcile()
    assert env.r.pods == {} and env.backend.rules == {} and env.hub.desired == {}


def test_excluded_and_host_network_never_touched(env: Env) -> None:
    for u in (UID, UID2):
        env.fake_netns(u)
    env.set(AMBIENT, pod(UID, host_network=True), pod(UID2, namespace="kube-system", labels=AMBIENT))
    env.r.reconcile()
    assert env.r.pods == {} and env.backend.applies == 0 and env.hub.log == []
    assert {row["mode"] for row in env.r.status()} == {"none"}


def test_restart_adopts_without_duplicates_and_resends_to_proxy(env: Env) -> None:
    env.fake_netns(UID)
    env.fake_netns(UID2)
    env.set(AMBIENT, pod(UID), pod(UID2))
    env.r.reconcile()
    assert env.backend.applies == 2
    # "SIGKILL": a new reconciler and a new (empty) hub; pins, records and rules survive
    env.set(AMBIENT, pod(UID))  # UID2 was deleted while the agent was down
    env.hub = FakeHub()
    env.r = env.make()
    env.r.adopt()
    assert env.state(UID) == "pending" and env.state(UID2) == "pending"
    env.r.reconcile()
    assert env.state(UID) == "enrolled"
    assert env.backend.applies == 2, "intact rules are checked, not re-applied"
    assert env.backend.rules == {UID: 1}, "the stale pod's rules are removed"
    assert list(env.hub.desired) == [UID]
    assert UID2 in env.pins.released


def test_a_damaged_record_does_not_stop_a_restarted_agent(env: Env) -> None:
    """A record naming another uid than its file's (here one that is no pod uid) is set aside; the agent
    adopts the others (before, its adoption raised and the agent could not start)."""
    env.fake_netns(UID)
    env.set(AMBIENT, pod(UID))
    env.r.reconcile()
    damaged = json.loads((env.tmp / "pods" / f"{UID}.json").read_text()) | {"uid": "../../x"}
    (env.tmp / "pods" / f"{UID2}.json").write_text(json.dumps(damaged))
    env.hub = FakeHub()
    env.r = env.make()
    env.r.adopt()
    env.r.reconcile()
    assert env.state(UID) == "enrolled" and list(env.hub.desired) == [UID]
    assert (env.tmp / "pods" / f"{UID2}.json.unreadable").exists()


def test_a_failure_of_a_pod_whose_cgroup_is_gone_is_not_counted(env: Env) -> None:
    """No process is left in a pod whose cgroup is gone (its sandbox torn down before the agent learnt of
    it): its failed apply says so and is not an enrolment failure; one whose cgroup is there is."""
    env.fake_netns(UID)
    env.fake_netns(UID2)
    env.backend.fail_apply = True
    env.set(AMBIENT, pod(UID), pod(UID2))
    env.r.reconcile()
    env.r.pods[UID].cgroup_path = str(env.tmp / "gone")
    env.r.pods[UID2].cgroup_path = str(env.tmp)
    env.failures.clear()
    env.clock.t += 60
    env.r.reconcile()
    assert env.state(UID) == env.state(UID2) == "failed"
    assert env.r.pods[UID].reason.startswith("pod cgroup gone") and env.failures == ["rules"]


def test_restart_before_source_synced_removes_nothing(env: Env) -> None:
    env.fake_netns(UID)
    env.set(AMBIENT, pod(UID))
    env.r.reconcile()
    env.store = PodStore()  # a fresh source that has not listed yet
    env.r = env.make()
    env.r.adopt()
    env.r.reconcile()
    assert env.backend.rules == {UID: 1} and UID in env.r.pods


def test_only_passes_over_a_fully_listed_source_count_as_synced(env: Env) -> None:
    """The annotation marker waits for such a pass (`synced_passes`): before it, a pod whose namespace is
    not listed yet is not held, and taking its annotation off would lose an earlier agent's mark."""
    env.store = PodStore()
    env.r = env.make()
    env.store.replace_pods([pod(UID)])  # the namespaces not listed yet
    env.r.reconcile()
    assert (env.r.passes, env.r.synced_passes) == (1, 0)
    env.store.replace_namespaces([])
    env.r.reconcile()
    assert (env.r.passes, env.r.synced_passes) == (2, 1)


def test_drift_is_repaired_and_counted(env: Env) -> None:
    env.fake_netns(UID)
    env.set(AMBIENT, pod())
    env.r.reconcile()
    env.backend.flush(UID)
    env.clock.t += 2.5
    env.r.reconcile()
    assert env.backend.rules == {UID: 1}
    assert env.repairs == 1


def test_node_reboot_pod_is_failed_and_retried_never_enrolled(env: Env) -> None:
    """The pinned netns is gone after a reboot and no process of the pod is found."""
    env.records.save(EnrolRecord(UID, "app", "p-1", 4242, ("10.0.0.5",), "fake"))
    env.set(AMBIENT, pod())
    env.r.adopt()
    for _ in range(4):
        env.r.reconcile()
        st = env.r.pods[UID]
        assert st.state == "failed"
        assert "netns" in st.reason
        env.clock.t += 60
    assert env.r.pods[UID].attempts >= 3
    assert env.hub.log == [] and env.backend.rules == {}
    row = next(r for r in env.r.status() if r["uid"] == UID)
    assert row["state"] == "failed"
    # the pod comes back (its processes are found): enrolled on the next retry
    env.fake_netns(UID)
    env.clock.t += 60
    env.r.reconcile()
    assert env.state(UID) == "enrolled"


def test_proxy_nack_fails_and_retries(env: Env) -> None:
    env.fake_netns(UID)
    env.hub.nack_next = "cannot open listeners"
    env.set(AMBIENT, pod())
    env.r.reconcile()
    assert env.state(UID) == "failed" and "cannot open listeners" in env.r.pods[UID].reason
    assert env.backend.rules == {}
    env.r.reconcile()
    assert env.state(UID) == "failed"  # still backing off
    env.clock.t += 60
    env.r.reconcile()
    assert env.state(UID) == "enrolled"


def test_backend_failure_rolls_back_proxy(env: Env) -> None:
    env.fake_netns(UID)
    env.backend.fail_apply = True
    env.set(AMBIENT, pod())
    env.r.reconcile()
    assert env.state(UID) == "failed" and "rules" in env.r.pods[UID].reason
    assert UID not in env.hub.desired


def add_in_background(env: Env, netns: Path, timeout: float) -> tuple[threading.Thread, list[object]]:
    """The pod's CNI ADD (IP 10.0.0.7) on a thread of its own: (the thread, the list its outcome goes to)."""
    result: list[object] = []
    t = threading.Thread(
        target=lambda: result.append(env.r.cni_add(UID, "app", "p-1", str(netns), ("10.0.0.7",), timeout=timeout))
    )
    t.start()
    return t, result


def test_cni_add_waits_for_ack_and_del_removes(env: Env) -> None:
    env.hub.auto_ack = False
    env.set(
        {},
    )  # the source does not know the pod yet
    netns = env.fake_netns(UID)
    env.clock.real = True
    env.r.start()
    try:
        t, result = add_in_background(env, netns, timeout=10)
        for _ in range(200):
            if env.hub.pending:
                break
            threading.Event().wait(0.01)
        assert env.hub.pending and not result, "ADD must not return before the proxy acked"
        env.hub.ack_all()
        t.join(10)
        assert result[0].ok and result[0].state == "enrolled"  # type: ignore[attr-defined]
        assert env.backend.rules == {UID: 1}
        out = env.r.cni_del(UID)
        assert out.ok and env.backend.rules == {} and env.pins.inode(UID) is None
    finally:
        env.r.stop()


def test_a_cni_hint_outlives_an_add_that_waits_longer_than_its_ttl(env: Env) -> None:
    """An ADD may wait up to --cni-add-timeout (up to an hour): the pod the ADD stands in for (the source
    does not show it yet) stays wanted, with the ADD's IPs, for as long as the ADD waits."""
    env.hub.auto_ack = False
    env.set({})  # the source does not know the pod
    netns = env.fake_netns(UID)
    env.r.hint_ttl = 0.3
    env.clock.real = True
    env.r.start()
    try:
        t, result = add_in_background(env, netns, timeout=5)
        time.sleep(0.8)  # past the hint's own TTL
        assert not result and env.state(UID) == "pending", "the pod must still be held for its ADD"
        env.hub.ack_all()
        t.join(5)
        assert result[0].ok and result[0].state == "enrolled"  # type: ignore[attr-defined]
    finally:
        env.r.stop()


def test_a_pod_the_source_showed_and_then_deleted_is_let_go_while_its_hint_lives(env: Env) -> None:
    """The ADD's hint stands in for a pod the source does not show yet; once the source has shown it, the
    source says whether it is still there: a pod deleted soon after its ADD, whose DEL does not come (its
    sandbox lost), is let go at once, not held (pinned, redirected, at the proxy) until the hint expires."""
    netns = env.fake_netns(UID)
    env.set(AMBIENT, pod(ips=("10.0.0.5",)))
    env.r.reconcile()  # found through its process and enrolled: its ADD is answered without another pass
    env.clock.real = True
    env.r.start()
    try:
        assert env.r.cni_add(UID, "app", "p-1", str(netns), ("10.0.0.5",), timeout=2).ok
        env.store.replace_pods([])  # deleted in the API
        env.r.wake()
        deadline = time.monotonic() + 5
        while UID in env.r.pods and time.monotonic() < deadline:
            time.sleep(0.02)
        assert UID not in env.r.pods and env.backend.rules == {} and env.pins.inode(UID) is None
        assert UID not in env.hub.desired
    finally:
        env.r.stop()


def test_cni_add_times_out_without_proxy(env: Env) -> None:
    env.hub.auto_ack = False
    env.set({})
    netns = env.fake_netns(UID)
    env.clock.real = True
    env.r.start()
    try:
        out = env.r.cni_add(UID, "app", "p-1", str(netns), (), timeout=0.5)
        assert not out.ok and out.retry and "timed out" in out.error
        assert env.backend.rules == {}
    finally:
        env.r.stop()


def test_sidecar_pod_handed_over_by_plugin(env: Env) -> None:
    from cni.contract.spec import SidecarSpec

    netns = env.fake_netns(UID)
    env.set(
        {}, pod(annotations={"sidecar.istio.io/status": "{}", "traffic.sidecar.istio.io/excludeInboundPorts": "9000"})
    )
    seen: list[object] = []
    orig = env.backend.apply

    def spy(target: PodTarget, spec: object) -> None:
        seen.append(spec)
        orig(target, spec)

    env.backend.apply = spy  # type: ignore[method-assign]
    out = env.r.cni_sidecar_add(UID, "app", "p-1", str(netns), (), timeout=1)
    assert out.ok and out.state == "enrolled"
    assert isinstance(seen[0], SidecarSpec) and 9000 in seen[0].exclude_inbound_ports
    assert env.r.cni_check(UID).ok
    assert env.hub.log == [], "sidecar pods are not the node proxy's"
    row = next(r for r in env.r.status() if r["uid"] == UID)
    assert (row["mode"], row["state"]) == ("sidecar", "enrolled")
    assert env.r.cni_del(UID).ok and env.backend.rules == {}


def test_sidecar_pod_the_plugin_socket_looked_up_is_not_waited_for(env: Env) -> None:
    """The plugin-socket ADD hands over the Pod it looked up (a GET on a cache miss): applied at once, not
    after the agent's pod source has it (it polls every 100 ms until the timeout)."""
    netns = env.fake_netns(UID)
    looked_up = pod(annotations={"sidecar.istio.io/status": "{}"})
    env.set({}, pod(uid=UID2))  # the source does not have it yet
    env.clock.real = True
    out = env.r.cni_sidecar_add(UID, "app", "p-1", str(netns), (), timeout=0.3)
    assert not out.ok and out.state == "pending"  # without it: waited for, in vain
    t0 = time.monotonic()
    out = env.r.cni_sidecar_add(UID, "app", "p-1", str(netns), (), timeout=5, pod=looked_up)
    assert out.ok and out.state == "enrolled" and time.monotonic() - t0 < 0.1


def test_sidecar_bad_annotation_is_refused(env: Env) -> None:
    netns = env.fake_netns(UID)
    env.set(
        {}, pod(annotations={"sidecar.istio.io/status": "{}", "traffic.sidecar.istio.io/excludeInboundPorts": "http"})
    )
    out = env.r.cni_sidecar_add(UID, "app", "p-1", str(netns), (), timeout=1)
    assert not out.ok and not out.retry and "annotations" in out.error


def test_cni_add_for_pod_the_source_puts_elsewhere_fails_after_grace(env: Env) -> None:
    netns = env.fake_netns(UID)
    env.set({}, pod())  # the source says: not labelled
    env.clock.real = True
    env.r.start()
    try:
        t0 = time.monotonic()
        out = env.r.cni_add(UID, "app", "p-1", str(netns), (), timeout=2)
        assert not out.ok and out.retry and "mode 'none'" in out.error
        assert time.monotonic() - t0 < 1.9
        assert env.backend.rules == {}
    finally:
        env.r.stop()


def test_cni_add_is_served_during_a_long_drift_pass(env: Env) -> None:
    """The drift check reads each pod's rules outside the lock: a CNI ADD arriving in the middle of a
    slow pass (40 pods x 50 ms) is enrolled before the pass ends, and `status` answers meanwhile."""
    uids = [f"bbbbbbbb-0000-0000-0000-{i:012d}" for i in range(40)]
    for uid in uids:
        env.fake_netns(uid)
    env.clock.real = True
    env.r.start()
    try:
        env.set(AMBIENT, *(pod(uid) for uid in uids))
        deadline = time.monotonic() + 10
        while not all(env.state(uid) == "enrolled" for uid in uids):
            assert time.monotonic() < deadline, "pods not enrolled"
            time.sleep(0.02)

        fast_check = env.backend.check
        checking = threading.Event()

        def slow_check(target: PodTarget, spec: object) -> list[str]:
            checking.set()
            time.sleep(0.05)
            return fast_check(target, spec)

        env.backend.check = slow_check  # type: ignore[method-assign]
        env.r.drift.last_run = -1e9  # the next pass runs the drift check
        env.r.wake()
        assert checking.wait(5), "the drift pass never started"
        netns = env.fake_netns(UID)
        t0 = time.monotonic()
        assert len(env.r.status()) == 40
        status_took = time.monotonic() - t0
        out = env.r.cni_add(UID, "app", "p-new", str(netns), ("10.0.0.9",), timeout=10)
        took = time.monotonic() - t0
        assert out.ok and out.state == "enrolled"
        assert status_took < 0.5 and took < 0.5, (status_took, took)  # the whole pass takes ~2 s
    finally:
        env.r.stop()


def test_enrolled_pods_move_backend_when_the_choice_changes(env: Env) -> None:
    """An ambient pod enrolled on the fallback (the node backend declined it, e.g. no proxy cgroup yet)
    moves to the node backend once that backend accepts it: old redirection removed, new one applied."""
    from tests.unit.agent_fakes import FakeBackend

    class Node(FakeBackend):
        name = "ebpf"
        reason: str | None = "the node proxy's cgroup is unknown"
        needs_cgroup = False
        change_events = False

        def fallback_reason(self, spec: object) -> str | None:
            return self.reason

    class Fallback(FakeBackend):
        name = "iptables"

    node, fallback = Node(), Fallback()
    r = Reconciler(env.store, node, env.hub, env.pins, env.records, scan=env.scan,
                   read_ips=lambda path: ("10.9.9.9",), find_by_ips=env.by_ips, conntrack=env.ct,
                   fallback=fallback, clock=env.clock)
    env.fake_netns(UID)
    env.set(AMBIENT, pod())
    r.reconcile()
    assert r.pods[UID].state == "enrolled" and r.pods[UID].backend == "iptables"
    assert fallback.rules == {UID: 1} and node.rules == {}
    node.reason = None  # e.g. the proxy connected and its cgroup was learned
    r.reconcile()
    assert r.pods[UID].backend == "iptables", "nothing moves until asked"
    r.rechoose_backends()
    r.reconcile()  # the move's apply runs on its own pool; a later pass collects it
    assert r.pods[UID].state == "pending" and r.pods[UID].reason == "moving to the ebpf backend"
    for job in list(r.enrolment.jobs.values()):
        job.result(timeout=5)
    r.reconcile()
    assert r.pods[UID].state == "enrolled" and r.pods[UID].backend == "ebpf"
    assert fallback.rules == {} and node.rules == {UID: 1}
    assert env.records.load_all()[UID].backend == "ebpf"


def test_pod_without_ips_waits_for_its_cni_add(env: Env) -> None:
    """A labelled pod the source shows before its CNI ADD (no IPs in the object, none in the netns yet) is
    not sent to the proxy, which identifies workloads by IP; the ADD's IPs enrol it."""
    env.ips_in_netns = ()
    netns = env.fake_netns(UID)
    env.set(AMBIENT, pod(ips=()))
    env.r.reconcile()
    assert env.state(UID) == "pending" and "IPs" in env.r.pods[UID].reason
    assert UID not in env.hub.desired and env.backend.rules == {}
    env.clock.real = True
    env.r.start()
    try:
        out = env.r.cni_add(UID, "app", "p-1", str(netns), ("10.0.0.7", "fd00::7"), timeout=5)
    finally:
        env.r.stop()
    assert out.ok and out.state == "enrolled"
    assert env.hub.desired[UID].ips == ("10.0.0.7", "fd00::7") and env.r.pods[UID].ips == ("10.0.0.7", "fd00::7")


def test_cni_add_is_answered_once_the_pod_is_enrolled_with_its_ips(env: Env) -> None:
    """The agent may find a labelled pod's netns while the chain's ADD is still wiring it and read only
    some of its addresses (IPv4 in, IPv6 not yet): it enrols the pod with those. The ADD, which brings
    them all, is answered only once the pod is enrolled again with them: before, the app could start with
    no IPv6 rules in its netns (its IPv6 traffic bypassed the proxy) and the proxy not knowing that IP."""
    env.ips_in_netns = ("10.0.0.7",)  # mid-ADD: the IPv6 address not there yet
    netns = env.fake_netns(UID)
    env.set(AMBIENT, pod(ips=()))  # the object has no IPs before the ADD
    env.r.reconcile()
    assert env.state(UID) == "enrolled" and env.r.pods[UID].ips == ("10.0.0.7",)
    env.clock.real = True
    env.r.start()
    try:
        out = env.r.cni_add(UID, "app", "p-1", str(netns), ("10.0.0.7", "fd00::7"), timeout=5)
        assert out.ok and out.state == "enrolled"
        assert env.r.pods[UID].ips == ("10.0.0.7", "fd00::7"), "answered before the pod had its IPv6 address"
        assert env.hub.desired[UID].ips == ("10.0.0.7", "fd00::7") and env.backend.applies == 2
    finally:
        env.r.stop()


def test_ips_are_compared_as_addresses() -> None:
    assert same_ips(("10.0.0.7", "fd00::7"), ("FD00:0::7", "10.0.0.7", "10.0.0.7"))
    assert not same_ips(("10.0.0.7",), ("10.0.0.7", "fd00::7"))
    assert same_ips(("not-an-ip",), ("not-an-ip",)) and not same_ips(("not-an-ip",), ("10.0.0.7",))
    hint = CniHint(UID, "app", "p-1", "/x", ("fd00::7",), 0.0)
    assert hint.ips_for(pod(ips=("FD00::7",))).ips == ("FD00::7",), "the same address: the pod as it is"
    assert hint.ips_for(pod(ips=())).ips == ("fd00::7",) and hint.ips_for(pod(ips=("10.0.0.5",))).ips == ("fd00::7",)
    assert replace(hint, ips=()).ips_for(pod(ips=("10.0.0.5",))).ips == ("10.0.0.5",)


def new_sandbox_after_enrolment(env: Env) -> Path:
    """UID enrolled with its object's IP 10.0.0.5, then given a new sandbox (netns), whose ADD has not come
    yet; the loop running on the real clock. The new netns."""
    env.fake_netns(UID)
    env.set(AMBIENT, pod(ips=("10.0.0.5",)))
    env.r.reconcile()
    assert env.state(UID) == "enrolled"
    new = env.tmp / "ns-new"
    new.write_text("")
    env.netns[UID] = new
    env.clock.real = True
    env.r.start()
    return new


def test_a_new_sandbox_is_enrolled_with_its_add_ips_not_the_objects_older_ones(env: Env) -> None:
    """A pod whose sandbox is replaced keeps the old sandbox's IPs in its object until the kubelet writes
    the new ones: the ADD's IPs, its new sandbox's own, are the ones enrolled and answered."""
    new = new_sandbox_after_enrolment(env)
    try:
        out = env.r.cni_add(UID, "app", "p-1", str(new), ("10.0.0.8",), timeout=5)
        assert out.ok and out.state == "enrolled"
        assert env.r.pods[UID].ips == ("10.0.0.8",) and env.hub.desired[UID].ips == ("10.0.0.8",)
        env.r.reconcile()
        assert env.r.pods[UID].ips == ("10.0.0.8",), "the object's older IPs must not win while the ADD's hold"
    finally:
        env.r.stop()


def test_a_pod_not_wired_yet_waits_for_its_add_without_failing(env: Env) -> None:
    """A pod created in an ambient namespace shows in the source before its sandbox is wired: no IPs, and
    (containerd: the infra process starts after the ADD) no process to find its netns by. That is the
    normal way of every new pod, not an enrolment failure: it waits, `pending`, with no failure counted
    or logged; its ADD enrols it at once."""
    failures = env.failures
    env.set(AMBIENT, pod(ips=()))
    env.r.reconcile()
    st = env.r.pods[UID]
    assert (st.state, failures) == ("pending", []) and "ADD" in st.reason, (st.state, st.reason, failures)
    netns = env.tmp / "ns-from-add"  # only the ADD names it (no process of the pod to find it by)
    netns.write_text("")
    env.clock.real = True
    env.r.start()
    try:
        t0 = time.monotonic()
        out = env.r.cni_add(UID, "app", "p-1", str(netns), ("10.0.0.7",), timeout=5)
    finally:
        env.r.stop()
    assert out.ok and out.state == "enrolled" and time.monotonic() - t0 < 1.0 and failures == []
    assert env.hub.log == [("add", UID)], "a pod that had no sandbox yet is not removed first (nor the proxy told)"
    env.set(AMBIENT, pod(uid=UID2, ips=("10.0.0.8",)))  # IPs but no netns to be found: a failure
    env.r.reconcile()
    assert env.state(UID2) == "failed" and failures == ["netns not found"]


def test_a_sandbox_keeps_its_add_ips_after_the_hint_while_the_object_shows_older_ones(env: Env) -> None:
    """The ADD's IPs belong to the sandbox it wired: once the pod is enrolled with them in that netns, a pod
    object that still shows an older sandbox's IPs (the kubelet cannot write the new ones: API server out
    of reach) does not take the pod back to them when the ADD's hint has expired."""
    env.r.hint_ttl = 0.1
    new = new_sandbox_after_enrolment(env)
    try:
        out = env.r.cni_add(UID, "app", "p-1", str(new), ("10.0.0.8",), timeout=0.5)
        assert out.ok and env.r.pods[UID].ips == ("10.0.0.8",)
        time.sleep(0.8)  # past the ADD's deadline + the hint's TTL
        env.r.reconcile()
        assert UID not in env.r.hints
        assert env.r.pods[UID].ips == ("10.0.0.8",) and env.hub.desired[UID].ips == ("10.0.0.8",)
    finally:
        env.r.stop()


def test_a_sandbox_keeps_its_add_ips_across_an_agent_restart(env: Env) -> None:
    """The ADD's IPs, bound to the netns they came with, are in the pod's record: an agent restarted while
    the pod object still shows an older sandbox's IPs adopts the pod with the ADD's and keeps them there
    (and the proxy on them); a record written before (no ADD IPs) leaves the object's to count."""
    new = new_sandbox_after_enrolment(env)
    assert env.records.load_all()[UID].add_ips == ()
    try:
        assert env.r.cni_add(UID, "app", "p-1", str(new), ("10.0.0.8",), timeout=0.5).ok
    finally:
        env.r.stop()
    assert env.records.load_all()[UID].add_ips == ("10.0.0.8",)
    env.hub = FakeHub()  # "SIGKILL": a new reconciler and hub; the ADD's hint is gone with the old one
    env.r = env.make()
    env.r.adopt()
    env.r.reconcile()
    assert env.state(UID) == "enrolled" and env.r.pods[UID].ips == ("10.0.0.8",)
    assert env.hub.desired[UID].ips == ("10.0.0.8",) and env.backend.applies == 2


def test_an_add_is_answered_enrolled_when_its_ips_cannot_be_recorded(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record's ADD IPs serve a later restart only: a state dir that refuses the write costs that, not
    the ADD of a pod that is enrolled."""
    env.fake_netns(UID)
    env.set(AMBIENT, pod(ips=("10.0.0.5",)))
    env.r.reconcile()
    def refuse(rec: object) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(env.records, "save", refuse)
    env.clock.real = True
    env.r.start()
    try:
        out = env.r.cni_add(UID, "app", "p-1", str(env.netns[UID]), ("10.0.0.5",), timeout=0.5)
    finally:
        env.r.stop()
    assert out.ok and env.r.pods[UID].add_ips == ("10.0.0.5",)


def test_enrolled_pod_whose_ips_change_is_sent_and_applied_again(env: Env) -> None:
    env.fake_netns(UID)
    env.set(AMBIENT, pod(ips=("10.0.0.5",)))
    env.r.reconcile()
    assert env.state(UID) == "enrolled" and env.backend.applies == 1
    env.set(AMBIENT, pod(ips=("10.0.0.5", "fd00::5")))
    env.r.reconcile()
    assert env.state(UID) == "enrolled"
    assert env.hub.desired[UID].ips == ("10.0.0.5", "fd00::5")
    assert env.backend.applies == 2 and env.backend.rules == {UID: 1}
    assert env.records.load_all()[UID].ips == ("10.0.0.5", "fd00::5")
    env.r.reconcile()
    assert env.backend.applies == 2, "no change: nothing re-applied"


def test_restart_verifies_adopted_rules_in_the_same_pass_outside_the_lock(env: Env) -> None:
    """Adopted pods are enrolled on the rules found in place; the same reconcile() then reads them back
    (the drift pass, one pod per lock hold) and repairs what was lost while the agent was down."""
    env.fake_netns(UID)
    env.fake_netns(UID2)
    env.set(AMBIENT, pod(UID), pod(UID2))
    env.r.reconcile()
    env.backend.flush(UID2)  # lost while the agent was down
    env.hub = FakeHub()
    env.r = env.make()
    env.r.adopt()
    checked: list[str] = []
    check = env.backend.check

    def counting(target: PodTarget, spec: object) -> list[str]:
        assert not env.r.table.lock._is_owned(), "the read-back must run outside the agent's lock"  # type: ignore[attr-defined]
        checked.append(target.uid)
        return check(target, spec)

    env.backend.check = counting  # type: ignore[method-assign]
    env.r.drift.last_run = env.clock.t  # a drift pass just ran: only the adoption makes this one run
    env.r.reconcile()
    assert sorted(checked) == sorted([UID, UID2])
    assert env.backend.rules == {UID: 1, UID2: 1} and env.repairs == 1
    assert env.state(UID) == "enrolled" and env.state(UID2) == "enrolled"


def test_status_never_waits_for_the_reconcile_lock_and_shows_the_proxy(env: Env) -> None:
    """A status request reads the published snapshot: it answers while another thread holds the lock
    (a long pass, an ADD storm), and an enrolled ambient pod whose proxy is gone says so."""
    import threading
    import time

    from node_agent.serve.status_client import state_text

    env.fake_netns(UID)
    env.set(AMBIENT, pod())
    env.r.reconcile()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with env.r.table.lock:
            held.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    try:
        started = time.perf_counter()
        rows = env.r.status()
        took = time.perf_counter() - started
    finally:
        release.set()
        holder.join(5)
    assert took < 0.05, f"status took {took:.3f} s while the lock was held"
    row = next(r for r in rows if r["uid"] == UID)
    assert (row["state"], row["proxy"]) == ("enrolled", "connected")
    env.hub.connected = False
    row = next(r for r in env.r.status() if r["uid"] == UID)
    assert row["proxy"] == "disconnected" and state_text(row) == "enrolled, proxy disconnected"
    assert env.r.enrolled_without_proxy() == 1


def test_proxy_state_over_several_transports() -> None:
    from node_agent.reconcile.status import proxy_state

    assert proxy_state({"connected": False}) == "disconnected"
    assert proxy_state({"connected": True, "snapshot_acked": False}) == "syncing"
    assert proxy_state({"connected": True, "snapshot_acked": True}) == "connected"
    zds_only = {"connected": True, "snapshot_acked": False, "zds": {"connected": True, "snapshot_acked": True}}
    assert proxy_state(zds_only) == "connected"
