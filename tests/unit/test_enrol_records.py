"""Enrolment records on disk: what an agent writes reads back the same; a record that cannot be used (a
damaged file, a hand edit) is set aside with a warning, never stops the agent, and is not read again."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from node_agent.reconcile.records import EnrolRecord, RecordStore

UID = "0b5e6f2a-1c3d-4e5f-8a9b-0c1d2e3f4a5b"
GOOD = EnrolRecord(UID, "shop", "web", 7, ("10.0.0.2", "fd00::2"), "nftables", tcp_loose=1,
                   annotations=(("traffic.sidecar.istio.io/excludeOutboundPorts", "9000"),),
                   add_ips=("10.0.0.2", "fd00::2"))


def raw(**changes: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"uid": UID, "namespace": "shop", "name": "web", "netns_inode": 7,
                           "ips": ["10.0.0.2"], "backend": "nftables"}
    return out | changes


def test_a_record_reads_back_as_written(tmp_path: Path) -> None:
    RecordStore(tmp_path).save(GOOD)
    assert RecordStore(tmp_path).load_all() == {UID: GOOD}


def test_an_older_agents_record_reads_with_defaults(tmp_path: Path) -> None:
    (tmp_path / f"{UID}.json").write_text(json.dumps(raw()))
    rec = RecordStore(tmp_path).load_all()[UID]
    assert (rec.ips, rec.add_ips, rec.mode, rec.service_account) == (("10.0.0.2",), (), "ambient", "default")


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{not json", "not JSON"),
        (json.dumps([raw()]), "a list"),
        (json.dumps(raw(uid="../../etc")), "a uid that is not the file's name"),
        (json.dumps(raw(ips="10.0.0.7")), "IPs as a string (read as its characters before)"),
        (json.dumps(raw(ips=["not-an-ip"])), "an IP that is none"),
        (json.dumps(raw(ips=[7])), "an IP that is a number"),
        (json.dumps(raw(add_ips=["10.0.0.300"])), "an ADD IP that is none"),
        (json.dumps(raw(netns_inode=-1)), "a negative inode"),
        (json.dumps(raw(netns_inode="x")), "an inode that is no number"),
        (json.dumps(raw(namespace=["shop"])), "a namespace that is no string"),
        (json.dumps(raw(mode="host")), "an unknown mode"),
        (json.dumps(raw(annotations=[["only-a-key"]])), "an annotation that is no pair"),
        (json.dumps({k: v for k, v in raw().items() if k != "netns_inode"}), "a field missing"),
    ],
)
def test_an_unusable_record_is_set_aside_and_the_others_load(tmp_path: Path, content: str, why: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    other = EnrolRecord("1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9", "shop", "db", 9, ("10.0.0.3",), "nftables")
    store = RecordStore(tmp_path)
    store.save(other)
    (tmp_path / f"{UID}.json").write_text(content)
    with caplog.at_level(logging.WARNING, logger="headrace.agent.reconcile"):
        assert store.load_all() == {other.uid: other}, why
    assert "set aside" in caplog.text
    assert {p.name for p in tmp_path.iterdir()} == {f"{other.uid}.json", f"{UID}.json.unreadable"}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="headrace.agent.reconcile"):
        assert store.load_all() == {other.uid: other}
    assert caplog.text == ""  # not read (nor warned about) again


def test_a_write_a_killed_agent_left_unfinished_is_removed(tmp_path: Path) -> None:
    """replace_file writes `<uid>.json.tmp` then renames it: an agent killed in between leaves the temporary
    file (the record before it still counts); the next agent removes it."""
    store = RecordStore(tmp_path)
    store.save(GOOD)
    (tmp_path / f"{UID}.json.tmp").write_text('{"uid": "half')
    assert store.load_all() == {UID: GOOD}
    assert [p.name for p in tmp_path.iterdir()] == [f"{UID}.json"]
