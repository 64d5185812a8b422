"""The agent leaving the node when its DaemonSet goes away: the DaemonSet GET with the agent's own client
(at a local API server speaking real JSON), the decision and its retries, and the steps of leaving."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from node_agent.agent import uninstall
from node_agent.agent.config import AgentConfig, ConfigError, build_config
from node_agent.install_cni import owner

from tests.unit.agent_fake_apiserver import FakeApiServer


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    server.start()
    server.write_kubeconfig(tmp_path / "kubeconfig")
    yield server
    server.stop()


def config(tmp_path: Path) -> AgentConfig:
    kubeconfig = tmp_path / "kubeconfig"
    if not kubeconfig.exists():  # (the fake API server's, when a test has one)
        kubeconfig.write_text("{}")
    return build_config(kubeconfig=tmp_path / "kubeconfig", node_name="node1", state_dir=tmp_path / "state",
                        owner_daemonset="headrace-agent", agent_namespace="headrace-system")


@pytest.mark.parametrize(("state", "action"), [
    ("present", owner.KEEP), ("deleting", owner.UNINSTALL), ("gone", owner.UNINSTALL),
    ("forbidden", owner.UNINSTALL), ("failing", owner.UNKNOWN),
])
def test_the_daemonset_get_decides(api: FakeApiServer, tmp_path: Path, state: str, action: str) -> None:
    api.set_daemonset("headrace-system", "headrace-agent", state)
    verdict = uninstall.daemonset_verdict(config(tmp_path))
    assert verdict.action == action, verdict
    assert ("/apis/apps/v1/namespaces/headrace-system/daemonsets/headrace-agent", {}) in api.requests


def test_no_answer_is_unknown(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "kubeconfig").write_text(
        f'{{"apiVersion": "v1", "kind": "Config", "current-context": "t", "clusters": [{{"name": "t", '
        f'"cluster": {{"server": "http://127.0.0.1:{port}"}}}}], "users": [{{"name": "t", "user": {{"token": "x"}}}}], '
        f'"contexts": [{{"name": "t", "context": {{"cluster": "t", "user": "t"}}}}]}}')
    assert uninstall.daemonset_verdict(config(tmp_path), timeout=2).action == owner.UNKNOWN


def verdicts(*answers: owner.Verdict) -> tuple[list[int], Callable[[], owner.Verdict]]:
    """A check that gives these answers in turn (the last one for ever), and the list of its calls."""
    asked: list[int] = []

    def check() -> owner.Verdict:
        asked.append(1)
        return answers[min(len(asked), len(answers)) - 1]

    return asked, check


PRESENT = owner.decide(200, b'{"metadata": {"name": "headrace-agent"}}')
DELETING = owner.decide(200, b'{"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}')
GONE, FORBIDDEN, NO_ANSWER = owner.decide(404, None), owner.decide(403, None), owner.decide(None, None, "refused")


def started(check: Callable[[], owner.Verdict], delays: tuple[float, ...] = (0.0,),
            unseen: Callable[[owner.Verdict], None] | None = None) -> owner.OwnerCheck:
    """An OwnerCheck whose looks at start (one by default) are over."""
    checker = owner.OwnerCheck(check, pause=0.0, unseen=unseen)
    checker.START_DELAYS = delays
    checker.start()
    checker._thread.join(5)
    return checker


def test_the_last_answer_is_asked_again_while_unknown() -> None:
    asked, check = verdicts(PRESENT, NO_ANSWER, GONE)
    assert started(check).final().action == owner.UNINSTALL
    assert len(asked) == 3
    asked, check = verdicts(PRESENT, NO_ANSWER)
    assert started(check).final().action == owner.UNKNOWN
    assert len(asked) == 4  # three tries at termination


@pytest.mark.parametrize("answer", [GONE, FORBIDDEN])
def test_an_absence_counts_only_when_the_daemonset_was_seen_since_the_start(answer: owner.Verdict) -> None:
    assert started(verdicts(PRESENT, answer)[1]).final().action == owner.UNINSTALL
    # never readable (a wrong name, RBAC missing): every restart would look like an uninstall
    unseen: list[owner.Verdict] = []
    never = started(verdicts(answer)[1], unseen=unseen.append)
    assert unseen == [answer]
    final = never.final()
    assert final.action == owner.UNKNOWN and "never seen since the start" in final.reason


def test_a_deletion_timestamp_always_counts() -> None:
    checker = started(verdicts(FORBIDDEN, DELETING)[1])
    assert not checker.seen.is_set()
    assert checker.final().action == owner.UNINSTALL


def test_the_start_looks_again_until_it_sees_the_daemonset() -> None:
    asked, check = verdicts(FORBIDDEN, NO_ANSWER, PRESENT)
    checker = started(check, (0.0, 0.01, 0.01, 0.01, 0.01))
    assert checker.seen.is_set() and len(asked) == 3


def test_the_agent_asks_only_with_an_owner(tmp_path: Path) -> None:
    plain = build_config(kubeconfig=config(tmp_path).kubeconfig, node_name="node1", state_dir=tmp_path / "state")
    assert uninstall.owner_check(plain, lambda _c: pytest.fail("asked without --owner-daemonset")) is None
    assert uninstall.going_away(plain, None) is False
    checker = uninstall.owner_check(config(tmp_path), lambda _c: PRESENT, pause=0.0)
    assert checker is not None
    checker.start()
    assert checker.seen.wait(5)
    assert uninstall.going_away(config(tmp_path), checker) is False


def test_leaving_releases_unmarks_and_clears() -> None:
    calls: list[tuple[str, str, bool]] = []
    report = uninstall.leave_node(lambda: [("shop", "a"), ("shop", "b")], lambda ns, n, on: calls.append((ns, n, on)),
                                  lambda: 1, lambda: ["iptables-nft"])
    assert calls == [("shop", "a", False), ("shop", "b", False)]
    assert report == {"released": 2, "unmarked": 2, "kept": 1, "node_rules_removed": ["iptables-nft"]}


def test_leaving_stops_unmarking_at_the_first_refusal_and_still_clears() -> None:
    calls: list[str] = []

    def refused(ns: str, name: str, on: bool) -> None:
        calls.append(name)
        raise OSError("403 forbidden")

    cleared: list[bool] = []

    def clear() -> list[str]:
        cleared.append(True)
        return []

    report = uninstall.leave_node(lambda: [("shop", "a"), ("shop", "b")], refused, lambda: 0, clear)
    assert calls == ["a"] and cleared == [True]
    assert report["released"] == 2 and report["unmarked"] == 0


def test_keeping_pods_releases_and_unmarks_nothing() -> None:
    report = uninstall.leave_node(None, lambda *a: pytest.fail("unmarked a kept pod"), lambda: 2, lambda: ["nftables"])
    assert report == {"released": 0, "unmarked": 0, "kept": 2, "node_rules_removed": ["nftables"]}


@pytest.mark.parametrize(("kw", "message"), [
    ({"on_uninstall": "release"}, "--on-uninstall release needs --owner-daemonset"),
    ({"on_uninstall": "drop"}, "--on-uninstall 'drop'"),
    ({"owner_daemonset": "Bad_Name"}, "not a valid DaemonSet name"),
    ({"owner_daemonset": "ds", "agent_namespace": "no/such"}, "not a valid namespace name"),
])
def test_settings_are_checked(tmp_path: Path, kw: dict[str, str], message: str) -> None:
    (tmp_path / "kubeconfig").write_text("{}")
    with pytest.raises(ConfigError, match=message):
        build_config(kubeconfig=tmp_path / "kubeconfig", node_name="n", state_dir=tmp_path / "s", **kw)  # type: ignore[arg-type]


def test_the_owner_needs_the_kubernetes_api(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs the Kubernetes API"):
        build_config(objects_dir=tmp_path, state_dir=tmp_path / "s", owner_daemonset="headrace-agent")
