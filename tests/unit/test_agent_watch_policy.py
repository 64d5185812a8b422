"""The list/watch loop's pure rules (node_agent.sources.watch_policy): backoff, watch verdicts, error
classes, per-watcher figures and their metrics; no sleeping (clock and random source injected)."""

from __future__ import annotations

import pytest
from kubernetes.client.exceptions import ApiException
from node_agent.serve.metrics import AgentMetrics
from node_agent.sources.watch_policy import (
    REASONS,
    Backoff,
    BadResponseError,
    ErrorEventError,
    GoneError,
    ShortWatchError,
    StalledError,
    WatchStats,
    WatchTiming,
    error_reason,
)
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError


def test_backoff_doubles_from_1s_to_a_30s_cap_with_equal_jitter() -> None:
    top = Backoff(rand=lambda: 1.0)  # the highest draw: the ceiling itself
    assert [top.next_delay() for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    low = Backoff(rand=lambda: 0.0)  # the lowest draw: half of it
    assert [low.next_delay() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]


def test_backoff_draws_are_spread_and_reset_starts_over() -> None:
    draws = iter([0.25, 0.75, 0.5])
    b = Backoff(initial=2.0, maximum=8.0, rand=lambda: next(draws))
    assert b.next_delay() == pytest.approx(1.25)  # 2 * (0.5 + 0.125)
    assert b.next_delay() == pytest.approx(3.5)  # 4 * (0.5 + 0.375)
    b.reset()
    assert b.next_delay() == pytest.approx(1.5)  # 2 * (0.5 + 0.25)


def test_a_watch_that_ends_at_once_without_an_event_is_short() -> None:
    t = WatchTiming(short_watch=1.0, healthy_after=30.0)
    assert t.is_short(0.0, 0) and t.is_short(0.99, 0)
    assert not t.is_short(0.01, 1)  # it delivered something
    assert not t.is_short(1.0, 0)  # the server ended a quiet watch: resumed at once


def test_a_watch_with_events_or_that_lasted_is_healthy() -> None:
    t = WatchTiming(short_watch=1.0, healthy_after=30.0)
    assert t.is_healthy(0.1, 1) and t.is_healthy(30.0, 0)
    assert not t.is_healthy(29.9, 0) and not t.is_healthy(0.0, 0)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (GoneError("too old"), "gone"),
        (ApiException(status=410), "gone"),
        (ApiException(status=401), "unauthorized"),
        (ApiException(status=403), "forbidden"),
        (ApiException(status=429), "throttled"),
        (ApiException(status=404), "client_error"),
        (ApiException(status=503), "server_error"),
        (ApiException(status=0, reason="SSLError"), "connection"),
        (ErrorEventError(500, "etcd"), "server_error"),
        (ErrorEventError(None, "?"), "other"),
        (ShortWatchError("0.001s"), "short_watch"),
        (StalledError("90s"), "stalled"),
        (BadResponseError("not a watch event"), "bad_response"),
        (ValueError("Expecting value"), "bad_response"),
        (ConnectionRefusedError(), "connection"),
        (MaxRetryError(None, "/api/v1/pods", NewConnectionError(None, "refused")), "connection"),  # type: ignore[arg-type]
        (ProtocolError("Connection broken"), "connection"),
        (RuntimeError("?"), "other"),
    ],
)
def test_error_reasons(exc: BaseException, reason: str) -> None:
    assert error_reason(exc) == reason
    assert reason in REASONS


def test_watch_stats_count_and_age_by_the_injected_clock() -> None:
    now = [100.0]
    stats = WatchStats(clock=lambda: now[0])
    now[0] = 104.0
    f = stats.figures()
    assert (f.lists, f.watches, f.sync_age) == (0, 0, 4.0)  # never synced: since the creation
    assert f.errors == dict.fromkeys(REASONS, 0)
    stats.listed()
    stats.watch_opened()
    stats.failed("forbidden")
    stats.failed("not-a-reason")
    now[0] = 110.0
    f = stats.figures()
    assert (f.lists, f.watches, f.sync_age) == (1, 1, 6.0)
    assert f.errors["forbidden"] == 1 and f.errors["other"] == 1
    stats.synced()  # an event or a bookmark
    assert stats.figures().sync_age == 0.0


def test_kube_figures_are_exported_per_watcher_and_reason() -> None:
    now = [0.0]
    pods, namespaces = WatchStats(clock=lambda: now[0]), WatchStats(clock=lambda: now[0])
    namespaces.listed()
    pods.failed("forbidden")
    pods.failed("forbidden")
    now[0] = 42.0
    metrics = AgentMetrics()
    metrics.watch_kube_source(lambda: {"pods": pods.figures(), "namespaces": namespaces.figures()})
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
    }
    assert samples[("headrace_agent_kube_watch_errors_total", (("reason", "forbidden"), ("resource", "pods")))] == 2
    assert samples[("headrace_agent_kube_watch_errors_total", (("reason", "gone"), ("resource", "pods")))] == 0
    assert samples[("headrace_agent_kube_lists_total", (("resource", "namespaces"),))] == 1
    assert samples[("headrace_agent_kube_lists_total", (("resource", "pods"),))] == 0
    assert samples[("headrace_agent_kube_watches_total", (("resource", "pods"),))] == 0
    assert samples[("headrace_agent_kube_sync_age_seconds", (("resource", "pods"),))] == 42.0
    assert samples[("headrace_agent_kube_sync_age_seconds", (("resource", "namespaces"),))] == 42.0
