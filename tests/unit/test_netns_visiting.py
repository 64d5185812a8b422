"""`netns_runner.visiting`: a long-lived thread that reads inside a pod netns itself never goes on from
there. A failed return moves it to the agent's own netns and is raised as a plain OSError; when even that
fails the process ends (status 70) instead (pure: the netns entry and the agent's netns are stand-ins)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from node_agent.kernel import netns_runner

from cni.kernel.netns import NetnsReturnError


@contextmanager
def stuck(_netns: str) -> Iterator[None]:
    yield
    raise NetnsReturnError(1, "cannot go back")


class Exited(Exception):
    pass


def test_a_thread_that_cannot_return_is_moved_home_and_the_read_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    homes: list[str] = []
    monkeypatch.setattr(netns_runner, "staying_in", stuck)
    monkeypatch.setattr(netns_runner, "go_home", lambda: homes.append("home"))
    with pytest.raises(OSError) as err, netns_runner.visiting("/run/netns/pod"):
        pass
    assert homes == ["home"]
    assert not isinstance(err.value, NetnsReturnError) and "/run/netns/pod" in str(err.value)


def test_a_thread_that_cannot_even_go_home_ends_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> None:
        raise PermissionError(1, "setns refused")

    def exit_(status: int) -> None:
        raise Exited(status)

    monkeypatch.setattr(netns_runner, "staying_in", stuck)
    monkeypatch.setattr(netns_runner, "go_home", refuse)
    monkeypatch.setattr("node_agent.kernel.netns_runner.os._exit", exit_)
    with pytest.raises(Exited) as err, netns_runner.visiting("/run/netns/pod"):
        pass
    assert err.value.args == (netns_runner.EXIT_NOT_HOME,)


def test_errors_of_the_read_itself_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    @contextmanager
    def fine(_netns: str) -> Iterator[None]:
        yield

    monkeypatch.setattr(netns_runner, "staying_in", fine)
    with pytest.raises(ValueError), netns_runner.visiting("/run/netns/pod"):
        raise ValueError("bad table")
