"""How the Kubernetes pod source paces and guards its lists and watches, against the local fake API server:
the first list from the watch cache, 410s and empty watches backed off, stalled streams given up, TCP
keepalive, and the per-watcher figures of a watcher that keeps failing."""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from node_agent.serve.metrics import AgentMetrics
from node_agent.sources.kubernetes import KubernetesSource
from node_agent.sources.store import PodStore
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.agent_fake_apiserver import FakeApiServer
from tests.unit.test_agent_k8s_source import UID1, namespace, pod, wait_for

BACKOFF = {"backoff_initial": 0.1, "backoff_max": 0.4}


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    server.put("namespaces", namespace("app", {"istio.io/dataplane-mode": "ambient"}))
    server.put("pods", pod("p1", "node1", UID1))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def make_source(api: FakeApiServer, tmp_path: Path) -> Iterator[Callable[..., tuple[KubernetesSource, PodStore]]]:
    started: list[KubernetesSource] = []

    def make(**kw: Any) -> tuple[KubernetesSource, PodStore]:
        kubeconfig = tmp_path / "kubeconfig"
        api.write_kubeconfig(kubeconfig)
        store = PodStore()
        src = KubernetesSource(store, kubeconfig, "node1", **{"watch_timeout": 30, **BACKOFF, **kw})
        src.start()
        started.append(src)
        return src, store

    yield make
    for src in started:
        src.stop()


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_first_list_from_the_watch_cache_and_a_relist_after_410_consistent(api, make_source) -> None:
    _, store = make_source()
    wait_for(lambda: store.synced and api.count("pods", watch=True) >= 1)
    assert api.list_versions("pods") == ["0"] and api.list_versions("namespaces") == ["0"]
    api.compact()
    api.drop_watches()
    wait_for(lambda: api.count("pods", watch=False) >= 2)
    # the watch cache may be behind what the watch delivered: after a 410 the list is a consistent read
    assert api.list_versions("pods") == ["0", None]
    wait_for(lambda: api.count("pods", watch=True) >= 3)
    api.compact()
    api.drop_watches()
    wait_for(lambda: api.count("pods", watch=False) >= 3)
    assert api.list_versions("pods") == ["0", None, None]
    assert api.list_versions("namespaces")[0] == "0"


@pytest.mark.parametrize("answer", ["gone_event", "gone_status"])
def test_a_server_answering_410_gets_lists_spaced_by_the_backoff(api, make_source, answer: str) -> None:
    api.watch_answers["pods"] = answer
    src, store = make_source()
    wait_for(lambda: store.synced)
    time.sleep(2.0)
    lists = api.times("pods", watch=False)
    # delays drawn from [d/2, d], d = 0.1 s doubling to 0.4 s: about a list every 0.3 s, not hundreds
    assert 4 <= len(lists) <= 14, len(lists)
    for i, gap in enumerate(gaps(lists)):
        assert gap >= 0.5 * min(0.1 * 2**i, 0.4) * 0.95, (i, gaps(lists))
    assert api.list_versions("pods")[1:] == [None] * (len(lists) - 1)
    assert src.figures()["pods"].errors["gone"] >= len(lists) - 1
    assert src.figures()["namespaces"].errors["gone"] == 0


@pytest.mark.parametrize(("answer", "reason"), [("empty", "short_watch"), ("not_watch", "bad_response")])
def test_a_watch_answered_with_no_stream_is_backed_off(api, make_source, answer: str, reason: str) -> None:
    api.watch_answers["pods"] = answer
    src, store = make_source()
    wait_for(lambda: store.synced and api.count("pods", watch=True) >= 1)
    time.sleep(1.5)
    watches = api.times("pods", watch=True)
    # a re-watch at once would be hundreds a second; backed off: about one every 0.3 s
    assert len(watches) <= 14, len(watches)
    assert min(gaps(watches)) >= 0.05 * 0.95
    assert src.figures()["pods"].errors[reason] >= len(watches) - 1
    assert api.count("pods", watch=False) == 1  # the watch is resumed, nothing is listed again


def test_a_stalled_watch_is_given_up_within_the_stall_timeout(api, make_source) -> None:
    api.watch_answers["pods"] = "stall"  # headers, then silence: a half-open connection
    src, store = make_source(stall_timeout=0.5)
    wait_for(lambda: store.synced and api.count("pods", watch=True) >= 1)
    wait_for(lambda: api.count("pods", watch=True) >= 3, timeout=5.0)
    first, second, third = api.times("pods", watch=True)[:3]
    for gap in (second - first, third - second):
        assert 0.5 <= gap <= 0.5 + 0.4 + 0.3, gap  # the silence bound, the backoff, slack
    assert src.figures()["pods"].errors["stalled"] >= 2
    assert api.count("pods", watch=False) == 1  # resumed from the last version, no list


def test_a_quiet_watch_with_bookmarks_is_not_taken_for_stalled(api, make_source) -> None:
    api.bookmark_interval = 0.2
    src, store = make_source(stall_timeout=0.8)
    wait_for(lambda: store.synced and api.count("pods", watch=True) >= 1)
    time.sleep(2.0)
    assert api.count("pods", watch=True) == 1
    assert api.bookmarks_sent >= 10
    figures = src.figures()["pods"]
    assert figures.errors["stalled"] == 0 and figures.sync_age < 0.8  # bookmarks count as syncs
    assert src.pods.resource_version == str(api.rv)


def test_api_connections_use_tcp_keepalive(api, make_source) -> None:
    api.watch_answers["pods"] = "stall"
    src, store = make_source()
    wait_for(lambda: store.synced and src.pods._resp is not None)
    sock = src.pods._resp.connection.sock
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1  # urllib3's default kept


def test_a_refused_watcher_shows_in_the_metrics(api, make_source) -> None:
    api.refuse["pods"] = 403  # e.g. the ClusterRole lost `list pods`
    src, _ = make_source()
    metrics = AgentMetrics()
    metrics.watch_kube_source(src.figures)
    wait_for(lambda: src.figures()["pods"].errors["forbidden"] >= 3)
    wait_for(lambda: src.figures()["namespaces"].lists == 1)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
    }
    assert samples[("headrace_agent_kube_watch_errors_total", (("reason", "forbidden"), ("resource", "pods")))] >= 3
    assert samples[("headrace_agent_kube_lists_total", (("resource", "pods"),))] == 0
    assert samples[("headrace_agent_kube_lists_total", (("resource", "namespaces"),))] == 1
    assert samples[("headrace_agent_kube_watches_total", (("resource", "namespaces"),))] >= 1
    pods_age = samples[("headrace_agent_kube_sync_age_seconds", (("resource", "pods"),))]
    assert pods_age > samples[("headrace_agent_kube_sync_age_seconds", (("resource", "namespaces"),))]
    time.sleep(0.3)
    assert src.figures()["pods"].sync_age >= pods_age + 0.25  # never synced: it keeps growing


def test_a_watch_that_delivered_events_resets_the_backoff(api, make_source) -> None:
    api.refuse["pods"] = 500
    src, store = make_source(backoff_initial=0.1, backoff_max=0.8)
    wait_for(lambda: src.figures()["pods"].errors["server_error"] >= 4)  # the next delay up to 0.8 s
    del api.refuse["pods"]
    wait_for(lambda: store.synced and api.count("pods", watch=True) >= 1)
    api.put("pods", pod("p1", "node1", UID1, labels={"a": "b"}))
    wait_for(lambda: store.snapshot().pods[UID1].labels == {"a": "b"})
    watches = api.count("pods", watch=True)
    dropped = time.monotonic()
    api.drop_watches()
    wait_for(lambda: api.count("pods", watch=True) > watches)
    assert api.times("pods", watch=True)[-1] - dropped < 0.1 + 0.15  # from the shortest delay again
