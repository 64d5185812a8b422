"""A pod's backend name in the agent and in its record: the iptables flavour written down, the node's own
flavour read back as plain `iptables`, another flavour kept (a backend of that flavour clears the pod)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from node_agent.backends import names
from node_agent.reconcile.records import EnrolRecord, RecordStore


@pytest.mark.parametrize(
    ("name", "node", "on_disk"),
    [
        ("iptables", "nft", "iptables-nft"),
        ("iptables", "legacy", "iptables-legacy"),
        ("iptables-legacy", "nft", "iptables-legacy"),  # a pod held on the other flavour keeps it
        ("nftables", "nft", "nftables"),
        ("ebpf", "legacy", "ebpf"),
        ("", "nft", ""),
        ("iptables", "auto", "iptables"),  # unresolved: names as they are
        ("iptables", "", "iptables"),
    ],
)
def test_recorded_and_held_are_inverse(name: str, node: str, on_disk: str) -> None:
    assert names.recorded(name, node) == on_disk
    assert names.held(on_disk, node) == name


@pytest.mark.parametrize(
    ("name", "flavour"),
    [("iptables-legacy", "legacy"), ("iptables-nft", "nft"), ("iptables", None), ("iptables-xt", None),
     ("nftables", None), ("ebpf-nft", None), ("", None)],
)
def test_flavour_named(name: str, flavour: str | None) -> None:
    assert names.flavour_named(name) == flavour


def record(backend: str, leaving: str = "") -> EnrolRecord:
    return EnrolRecord("u1", "shop", "web", 7, ("10.0.0.2",), backend, leaving=leaving)


def test_a_record_names_the_flavour_and_reads_back_as_held(tmp_path: Path) -> None:
    store = RecordStore(tmp_path, "legacy")
    store.save(record("iptables", leaving="nftables"))
    raw = json.loads((tmp_path / "u1.json").read_text())
    assert (raw["backend"], raw["leaving"]) == ("iptables-legacy", "nftables")
    assert store.load_all()["u1"] == record("iptables", leaving="nftables")


def test_the_node_flavour_changed_the_pod_keeps_the_old_one(tmp_path: Path) -> None:
    RecordStore(tmp_path, "legacy").save(record("nftables", leaving="iptables"))
    assert RecordStore(tmp_path, "nft").load_all()["u1"] == record("nftables", leaving="iptables-legacy")
    RecordStore(tmp_path, "nft").save(record("iptables", leaving="iptables-legacy"))
    assert RecordStore(tmp_path, "legacy").load_all()["u1"] == record("iptables-nft", leaving="iptables")


def test_an_older_agents_record_means_the_nodes_flavour(tmp_path: Path) -> None:
    (tmp_path / "u1.json").write_text(json.dumps(
        {"uid": "u1", "namespace": "shop", "name": "web", "netns_inode": 7, "ips": ["10.0.0.2"],
         "backend": "iptables"}))
    assert RecordStore(tmp_path, "nft").load_all()["u1"] == record("iptables")


def test_an_ebpf_ambient_record_names_its_inbound_rules_backend(tmp_path: Path) -> None:
    store = RecordStore(tmp_path, "nft", ebpf_inbound="iptables")
    store.save(record("ebpf"))
    store.save(EnrolRecord("u2", "shop", "side", 8, (), "ebpf", mode="sidecar"))
    store.save(EnrolRecord("u3", "shop", "web", 9, (), "nftables"))
    raw = {u: json.loads((tmp_path / f"{u}.json").read_text())["inbound"] for u in ("u1", "u2", "u3")}
    assert raw == {"u1": "iptables-nft", "u2": "", "u3": ""}
    assert RecordStore(tmp_path, "legacy").load_all()["u1"].inbound == "iptables-nft"
    assert RecordStore(tmp_path, "nft").load_all()["u1"].inbound == "iptables"
