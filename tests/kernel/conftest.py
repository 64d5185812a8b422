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
    values = list(getattr(item, "funcargs", {}).values())
    runs = [v for v in values if isinstance(v, AgentRun)]
    runs += [x for v in values if isinstance(v, tuple) for x in v if isinstance(x, AgentRun)]
    for run in dict.fromkeys(runs):
        report.sections.extend(run.failure_logs())
