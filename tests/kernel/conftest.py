"""Fixtures of the kernel tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from node_agent.lab.agent_run import AgentRun

from tests.harness.bare_netns import bare_netns
from tests.harness.netns import NetNS


@pytest.fixture
def two() -> Iterator[tuple[str, str]]:
    """Two new bare netns (by name), deleted afterwards."""
    with bare_netns(2) as (first, second):
        yield first, second


@pytest.fixture
def ns() -> Iterator[NetNS]:
    """A new netns (only `lo`, down), deleted afterwards."""
    n = NetNS.create("hrns-")
    try:
        yield n
    finally:
        n.delete()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test that ran the agent or the proxy reports the ends of their logs (a CI failure is often
    all there is to go on)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when != "call" or not report.failed:
        return
    for run in dict.fromkeys(_agent_runs(list(getattr(item, "funcargs", {}).values()))):
        report.sections.extend(run.failure_logs())


def _agent_runs(values: list[object]) -> list[AgentRun]:
    """The AgentRuns among a test's fixture values, also inside the tuples some fixtures yield."""
    found: list[AgentRun] = []
    for v in values:
        if isinstance(v, AgentRun):
            found.append(v)
        elif isinstance(v, tuple):
            found += _agent_runs(list(v))
    return found
