"""Which pods a reconcile pass reads back when their backend announces changes: a pod once right after its
subscription, then only on change; every pod at the backstop; polled pods every drift interval; a pod that
leaves is unwatched."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from node_agent.backends.base import BackendError, PodTarget
from node_agent.reconcile.drift import NODE, NODE_POLL

from tests.unit.test_agent_reconcile import AMBIENT, UID, UID2, Env, pod


class FakeWatcher:
    def __init__(self, on_change: Callable[[str], None]) -> None:
        self.on_change = on_change
        self.held: dict[str, tuple[str, int]] = {}
        self.unwatched: list[str] = []

    def start(self) -> None: ...

    def watch(self, key: str, netns_path: str, inode: int = 0, *, routing: bool = True) -> str:
        if self.held.get(key) == (netns_path, inode):
            return "kept"
        self.held[key] = (netns_path, inode)
        return "new"

    def unwatch(self, key: str) -> None:
        self.held.pop(key, None)
        self.unwatched.append(key)

    def watched(self, key: str) -> bool:
        return key in self.held

    def keys(self) -> set[str]:
        return set(self.held)

    def close(self) -> None:
        self.held.clear()


def watched_and_counted(env: Env) -> tuple[list[str], list[FakeWatcher]]:
    """The drift check's watchers made fake (backstop 30 s) and the backend's full checks counted."""
    made: list[FakeWatcher] = []

    def factory(cb: Callable[[str], None]) -> FakeWatcher:
        made.append(FakeWatcher(cb))
        return made[-1]

    env.r.drift._watcher_factory = factory  # type: ignore[assignment]
    env.r.drift.backstop = 30.0
    checked: list[str] = []
    real = env.backend.check

    def counting(target: PodTarget, spec: object) -> list[str]:
        checked.append(target.uid)
        return real(target, spec)

    env.backend.check = counting  # type: ignore[method-assign]
    return checked, made


def setup(tmp_path: Path, *, events: bool = True) -> tuple[Env, list[str], list[FakeWatcher]]:
    env = Env(tmp_path)
    env.backend.change_events = events
    checked, made = watched_and_counted(env)
    env.fake_netns(UID)
    env.fake_netns(UID2)
    env.set(AMBIENT, pod(UID), pod(UID2, ips=("10.0.0.6",)))
    env.r.reconcile()
    env.r.reconcile()
    assert env.state(UID) == "enrolled" and env.state(UID2) == "enrolled"
    return env, checked, made


def enrolled_watched(env: Env) -> FakeWatcher:
    """One ambient pod enrolled on env's backend (backstop far off); the drift check's watcher."""
    _full, made = watched_and_counted(env)
    env.r.drift.backstop = 1000.0
    env.fake_netns(UID)
    env.set(AMBIENT, pod(UID))
    env.r.reconcile()
    env.r.reconcile()
    (w,) = made
    return w


def test_watched_pods_are_checked_after_subscribing_then_only_on_change_and_at_the_backstop(tmp_path: Path) -> None:
    env, checked, made = setup(tmp_path)
    (w,) = made
    assert w.keys() >= {UID, UID2}
    env.clock.t += 0.1
    env.r.reconcile()
    assert UID in checked and UID2 in checked  # once, right after the subscription
    checked.clear()
    for _ in range(5):  # drift intervals pass: nothing is polled
        env.clock.t += 2.5
        env.r.reconcile()
    assert checked == []
    w.on_change(UID)
    env.r.reconcile()
    assert checked == [UID]
    checked.clear()
    env.clock.t += 31
    env.r.reconcile()
    assert sorted(checked) == sorted([UID, UID2])  # the backstop: every pod


def test_a_pod_that_leaves_is_unwatched(tmp_path: Path) -> None:
    env, _checked, made = setup(tmp_path)
    (w,) = made
    env.set(AMBIENT, pod(UID))
    env.r.reconcile()
    assert UID2 in w.unwatched and UID2 not in w.keys() and UID in w.keys()


def test_without_events_every_pod_is_polled(tmp_path: Path) -> None:
    env, checked, made = setup(tmp_path, events=False)
    assert made == []  # no watcher at all
    checked.clear()
    env.clock.t += 2.5
    env.r.reconcile()
    assert sorted(checked) == sorted([UID, UID2])


def test_an_unwatched_node_netns_is_rechecked_every_node_poll_not_every_poll(tmp_path: Path) -> None:
    """Polled pods (legacy iptables, eBPF) are read back every drift interval; the node's probe SNAT
    (an iptables-save of the node netns) only every NODE_POLL, at the backstop, or when its pods change."""
    env, checked, _made = setup(tmp_path, events=False)
    env.r.drift.backstop = 1000.0
    env.clock.t += 2.5
    env.r.reconcile()
    calls = len(env.node_rules)
    polls = 0
    while env.clock.t - env.r.drift.last_node < NODE_POLL - 2.5:
        checked.clear()
        env.clock.t += 2.5
        env.r.reconcile()
        polls += 1
        assert sorted(checked) == sorted([UID, UID2])  # the pods: every pass
    assert polls >= 2 and len(env.node_rules) == calls  # the node: not on these passes
    env.clock.t += 2.5
    env.r.reconcile()
    assert len(env.node_rules) == calls + 1


def test_a_partly_announcing_backend_is_watched_polls_only_its_unannounced_part(tmp_path: Path) -> None:
    """eBPF ambient pods: the programs are polled every drift interval (`check_unannounced`), the inbound
    rules and routing (announced on the pod netns) are read (`check_announced`) only on change and right
    after the subscription; the full check at the backstop."""
    env = Env(tmp_path)
    env.backend.change_events = False
    partial: list[str] = []
    announced: list[str] = []
    env.backend.announces_part = lambda spec: True  # type: ignore[attr-defined]

    def unannounced(target: PodTarget, spec: object) -> list[str]:
        partial.append(target.uid)
        return []

    def announced_part(target: PodTarget, spec: object) -> list[str]:
        announced.append(target.uid)
        return []

    env.backend.check_unannounced = unannounced  # type: ignore[attr-defined]
    env.backend.check_announced = announced_part  # type: ignore[attr-defined]
    full, made = watched_and_counted(env)
    env.fake_netns(UID)
    env.set(AMBIENT, pod(UID))
    env.r.reconcile()
    env.r.reconcile()
    assert env.state(UID) == "enrolled"
    (w,) = made
    assert UID in w.keys()  # watched although its backend does not announce everything
    assert announced == [UID]  # its announced part right after the subscription
    announced.clear()
    full.clear()
    partial.clear()
    for _ in range(3):  # drift intervals: only the part that announces nothing
        env.clock.t += 2.5
        env.r.reconcile()
    assert full == [] and partial == [UID] * 3 and announced == []
    w.on_change(UID)  # the inbound rules or routing changed: that part is read
    env.r.reconcile()
    assert announced == [UID] and full == []
    env.clock.t += 31
    env.r.reconcile()
    assert full == [UID]  # the backstop: the full check


def test_a_node_whose_probe_rules_announce_nothing_stays_polled(tmp_path: Path) -> None:
    """iptables-legacy ambient pods are watched for their policy routing, but the node's probe SNAT is
    x_tables there (node_announces False): the node netns is not watched and is re-checked every
    NODE_POLL, as on a node with no watched pod at all."""
    env = Env(tmp_path)
    env.backend.change_events = False
    env.backend.announces_part = lambda spec: True  # type: ignore[attr-defined]
    env.backend.check_unannounced = lambda target, spec: []  # type: ignore[attr-defined]
    env.backend.check_announced = lambda target, spec: []  # type: ignore[attr-defined]
    env.r.drift.node_announces = False
    w = enrolled_watched(env)
    assert UID in w.keys() and NODE not in w.keys()
    calls, start = len(env.node_rules), env.r.drift.last_node
    for _ in range(int(NODE_POLL / 2.5) + 2):
        env.clock.t += 2.5
        env.r.reconcile()
    assert env.r.drift.last_node > start and len(env.node_rules) > calls  # read again on a poll pass


def test_a_pod_applied_during_a_polling_pass_is_left_to_the_next_poll(tmp_path: Path) -> None:
    """A wave of enrolments is not read back while it goes in (each read would hold the backend's lock
    between two applies): a polled pod applied during a pass that polls is read back by the next poll,
    so a bypass right after its apply is still repaired within one interval."""
    env = Env(tmp_path)
    env.backend.change_events = False
    checked, _made = watched_and_counted(env)
    interval = env.r.drift.interval
    env.r.reconcile()  # the agent's first pass (a backstop: every pod, of which there is none yet)
    env.clock.t += interval
    env.fake_netns(UID)
    env.set(AMBIENT, pod(UID))
    env.r.reconcile()  # applied in a pass that polls: not read back
    assert env.state(UID) == "enrolled" and checked == []
    env.backend.flush(UID)  # a bypass right after the apply
    env.clock.t += interval / 2
    env.r.reconcile()
    assert checked == []
    env.clock.t += interval / 2
    env.r.reconcile()  # the next poll, one interval after the apply: read back and repaired
    assert checked == [UID] and UID in env.backend.rules and env.repairs == 1


def test_pods_a_quiet_polls_backend_answers_for_are_not_read_on_a_poll_pass(tmp_path: Path) -> None:
    """QuietPolls (eBPF: its change count and pin events): the pods it answers for are skipped on a poll
    pass; it is asked about the polled pods only, never at the backstop or for an announced change."""
    env, checked, _made = setup(tmp_path, events=False)
    asked: list[list[tuple[str, bool]]] = []

    def unchanged(polls: list[tuple[str, object, bool]]) -> set[str]:
        asked.append(sorted((uid, part) for uid, _spec, part in polls))
        return {UID}

    env.backend.unchanged = unchanged  # type: ignore[attr-defined]
    env.r.drift.backstop = 1000.0
    checked.clear()
    env.clock.t += 2.5
    env.r.reconcile()
    assert checked == [UID2] and asked == [[(UID, False), (UID2, False)]]
    checked.clear()
    asked.clear()
    env.r.drift.last_full = env.clock.t - 1000.0  # the backstop: every pod read, nobody asked
    env.r.reconcile()
    assert sorted(checked) == sorted([UID, UID2]) and asked == []


def test_an_announced_change_is_read_though_the_backend_answers_for_every_poll(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.backend.change_events = False
    reads: list[str] = []
    env.backend.announces_part = lambda spec: True  # type: ignore[attr-defined]

    def reading(part: str) -> Callable[[PodTarget, object], list[str]]:
        def read(target: PodTarget, spec: object) -> list[str]:
            reads.append(part)
            return []
        return read

    env.backend.check_unannounced = reading("unannounced")  # type: ignore[attr-defined]
    env.backend.check_announced = reading("announced")  # type: ignore[attr-defined]
    env.backend.unchanged = lambda polls: {uid for uid, _spec, _part in polls}  # type: ignore[attr-defined]
    w = enrolled_watched(env)
    reads.clear()
    for _ in range(3):
        env.clock.t += 2.5
        env.r.reconcile()
    assert reads == []  # every poll answered for
    w.on_change(UID)
    env.r.reconcile()
    assert reads == ["announced"]


def test_a_backend_that_cannot_answer_has_its_pods_read(tmp_path: Path) -> None:
    env, checked, _made = setup(tmp_path, events=False)

    def unchanged(polls: object) -> set[str]:
        raise BackendError("inotify gone")

    env.backend.unchanged = unchanged  # type: ignore[attr-defined]
    checked.clear()
    env.clock.t += 2.5
    env.r.reconcile()
    assert sorted(checked) == sorted([UID, UID2])
