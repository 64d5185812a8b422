"""The agent leaving the node when its DaemonSet goes away: the DaemonSet GET with the agent's own client
(at a local API server speaking real JSON), the decision and its retries, and the steps of leaving."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from node_agent.agent import uninstall
from node_agent.agent.config import AgentConfig, ConfigError, build_config
from node_agent.agent.uninstall import OwnerCheck
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


def verdicts(*answers: owner.Verdict) -> tuple[list[AgentConfig], Callable[[AgentConfig], owner.Verdict]]:
    """A check that gives these answers in turn (the last one for ever), and the list of its calls."""
    asked: list[AgentConfig] = []

    def check(cfg: AgentConfig) -> owner.Verdict:
        asked.append(cfg)
        return answers[min(len(asked), len(answers)) - 1]

    return asked, check


PRESENT = owner.decide(200, b'{"metadata": {"name": "headrace-agent"}}')
DELETING = owner.decide(200, b'{"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}')
GONE, FORBIDDEN, NO_ANSWER = owner.decide(404, None), owner.decide(403, None), owner.decide(None, None, "refused")


def seen_at_start(check: OwnerCheck) -> None:
    check.start()
    assert check.seen.wait(5)


def test_going_away_asks_again_while_unknown(tmp_path: Path) -> None:
    asked, check = verdicts(PRESENT, NO_ANSWER, GONE)
    owner_check = OwnerCheck(config(tmp_path), check, pause=0.0)
    seen_at_start(owner_check)
    assert owner_check.going_away() is True
    assert len(asked) == 3
    asked, check = verdicts(PRESENT, NO_ANSWER)
    owner_check = OwnerCheck(config(tmp_path), check, pause=0.0)
    seen_at_start(owner_check)
    assert owner_check.going_away() is False and len(asked) == 4  # three tries at SIGTERM
    plain = build_config(kubeconfig=tmp_path / "kubeconfig", node_name="node1", state_dir=tmp_path / "state")
    never = OwnerCheck(plain, lambda _c: pytest.fail("asked without --owner-daemonset"))
    never.start()
    assert never.going_away() is False


@pytest.mark.parametrize("answer", [GONE, FORBIDDEN])
def test_an_absence_counts_only_when_the_daemonset_was_seen_since_the_start(tmp_path: Path,
                                                                            answer: owner.Verdict) -> None:
    _asked, check = verdicts(PRESENT, answer)
    seen = OwnerCheck(config(tmp_path), check, pause=0.0)
    seen_at_start(seen)
    assert seen.going_away() is True
    # never readable (a wrong name, RBAC missing): every restart would look like an uninstall
    _asked, check = verdicts(answer)
    never = OwnerCheck(config(tmp_path), check, pause=0.0)
    never.START_DELAYS = (0.0,)
    never.start()
    time.sleep(0.2)
    assert never.going_away() is False


def test_a_deletion_timestamp_always_counts(tmp_path: Path) -> None:
    _asked, check = verdicts(FORBIDDEN, DELETING)
    owner_check = OwnerCheck(config(tmp_path), check, pause=0.0)
    owner_check.START_DELAYS = (0.0,)
    owner_check.start()
    time.sleep(0.2)
    assert not owner_check.seen.is_set()
    assert owner_check.going_away() is True


def test_the_start_looks_again_until_it_sees_the_daemonset(tmp_path: Path) -> None:
    asked, check = verdicts(FORBIDDEN, NO_ANSWER, PRESENT)
    owner_check = OwnerCheck(config(tmp_path), check)
    owner_check.START_DELAYS = (0.0, 0.01, 0.01, 0.01, 0.01)
    seen_at_start(owner_check)
    assert len(asked) == 3


def test_leaving_releases_unmarks_and_clears() -> None:
    calls: list[tuple[str, str, bool]] = []
    report = uninstall.leave_node(lambda: [("shop", "a"), ("shop", "b")], lambda ns, n, on: calls.append((ns, n, on)),
                                  lambda: ["iptables-nft"])
    assert calls == [("shop", "a", False), ("shop", "b", False)]
    assert report == {"released": 2, "unmarked": 2, "node_rules_removed": ["iptables-nft"]}


def test_leaving_stops_unmarking_at_the_first_refusal_and_still_clears() -> None:
    calls: list[str] = []

    def refused(ns: str, name: str, on: bool) -> None:
        calls.append(name)
        raise OSError("403 forbidden")

    cleared: list[bool] = []

    def clear() -> list[str]:
        cleared.append(True)
        return []

    report = uninstall.leave_node(lambda: [("shop", "a"), ("shop", "b")], refused, clear)
    assert calls == ["a"] and cleared == [True]
    assert report["released"] == 2 and report["unmarked"] == 0


def test_keeping_pods_releases_and_unmarks_nothing() -> None:
    report = uninstall.leave_node(None, lambda *a: pytest.fail("unmarked a kept pod"), lambda: ["nftables"])
    assert report == {"released": 0, "unmarked": 0, "node_rules_removed": ["nftables"]}


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
