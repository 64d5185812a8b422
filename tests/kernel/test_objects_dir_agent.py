"""The agent's objects-dir source on inotify, end to end: a Pod object written (or its namespace
labelled) enrols the pod, and its file removed unenrols it, each well within the backstop rescan (10 s)
and with no poll: the agent says its directory is watched."""

from __future__ import annotations

import time

import pytest

from tests.kernel.agent_kit import ns_object, wait_for, write_object
from tests.kernel.test_drift_events import make_node

pytestmark = pytest.mark.kernel

LIMIT = 2.0  # the rescan backstop is 10 s away


def test_object_files_enrol_and_unenrol_pods_at_once() -> None:
    with make_node("nftables") as node:
        assert "objects dir watched (inotify" in node.agent.agent_log()
        t0 = time.monotonic()
        (uid,) = node.add_pods(1)
        wait_for(lambda: node.enrolled([uid]), LIMIT + 5, "pod enrolled")
        assert time.monotonic() - t0 <= LIMIT, f"enrolled {time.monotonic() - t0:.2f} s after its file"

        write_object(node.objects, "ns.json", ns_object("mesh", ambient=False))
        t0 = time.monotonic()
        wait_for(lambda: node.agent.status().get(uid, {}).get("state") != "enrolled", LIMIT + 5, "unenrolled")
        assert time.monotonic() - t0 <= LIMIT

        write_object(node.objects, "ns.json", ns_object("mesh", ambient=True))
        wait_for(lambda: node.enrolled([uid]), LIMIT + 5, "enrolled again")
        (node.objects / "pod0.json").unlink()
        t0 = time.monotonic()
        wait_for(lambda: uid not in node.agent.status(), LIMIT + 5, "pod gone with its file")
        assert time.monotonic() - t0 <= LIMIT
