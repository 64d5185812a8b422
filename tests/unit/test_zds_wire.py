"""ZDS wire bytes: each message pinned in tests/golden/zds/, a few checked by hand from the schema's field
numbers, and the decoders' checks (one fd with an add, none with anything else, the packet limit)."""

from __future__ import annotations

from pathlib import Path

import pytest
from node_agent.protocol import zds_wire
from node_agent.protocol.workload import WorkloadInfo

from tests.unit.golden import assert_golden

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "zds"

WORKLOAD = WorkloadInfo(uid="0f4c2d9e-7b1a-4c55-9d1e-3a2b1c0d9e8f", name="client-7d9c", namespace="shop",
                        service_account="client", ips=("10.0.0.5",), netns_path="/x", netns_inode=42)

MESSAGES = {
    "hello": zds_wire.hello(),
    "add": zds_wire.add(WORKLOAD),
    "keep": zds_wire.keep(WORKLOAD.uid),
    "del": zds_wire.delete(WORKLOAD.uid),
    "snapshot_sent": zds_wire.snapshot_sent(),
    "ack": zds_wire.ack(),
    "ack_error": zds_wire.ack("netns gone"),
}


def hexdump(data: bytes) -> str:
    return "\n".join(data[i:i + 16].hex(" ") for i in range(0, len(data), 16)) + "\n"


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_golden_bytes(name: str) -> None:
    assert_golden(GOLDEN / f"{name}.hex", hexdump(MESSAGES[name]))


def test_bytes_follow_the_schema_field_numbers() -> None:
    assert zds_wire.hello() == bytes([0x08, 0x01])  # ZdsHello.version = 1 (V1)
    assert zds_wire.snapshot_sent() == bytes([0x1A, 0x00])  # WorkloadRequest.snapshot_sent = 3, empty
    assert zds_wire.delete("u") == bytes([0x12, 0x03, 0x12, 0x01, 0x75])  # del = 2 { uid = 2 }
    assert zds_wire.keep("u") == bytes([0x2A, 0x03, 0x0A, 0x01, 0x75])  # keep = 5 { uid = 1 }
    assert zds_wire.ack() == bytes([0x0A, 0x00])  # WorkloadResponse.ack = 1, empty error
    w = WorkloadInfo(uid="u", name="n", namespace="s", service_account="a")
    # add = 1 { uid = 1 "u", workload_info = 2 { name = 1, namespace = 2, service_account = 3 } }; no field 4
    assert zds_wire.add(w) == bytes([0x0A, 0x0E, 0x0A, 0x01, 0x75, 0x12, 0x09,
                                     0x0A, 0x01, 0x6E, 0x12, 0x01, 0x73, 0x1A, 0x01, 0x61])


def test_round_trips() -> None:
    assert zds_wire.parse_hello(zds_wire.hello()) == zds_wire.ZDS_VERSION
    assert zds_wire.parse_ack(zds_wire.ack()) == ""
    assert zds_wire.parse_ack(zds_wire.ack("boom")) == "boom"
    r = zds_wire.parse_request(zds_wire.add(WORKLOAD), 1)
    assert (r.kind, r.uid, r.name, r.namespace, r.service_account) == (
        "add", WORKLOAD.uid, "client-7d9c", "shop", "client")
    assert zds_wire.parse_request(zds_wire.keep("k"), 0) == zds_wire.Request("keep", "k")
    assert zds_wire.parse_request(zds_wire.delete("d"), 0) == zds_wire.Request("del", "d")
    assert zds_wire.parse_request(zds_wire.snapshot_sent(), 0).kind == "snapshot_sent"


def test_descriptor_rules() -> None:
    with pytest.raises(zds_wire.ZdsWireError, match="exactly one netns fd"):
        zds_wire.parse_request(zds_wire.add(WORKLOAD), 0)
    with pytest.raises(zds_wire.ZdsWireError, match="exactly one netns fd"):
        zds_wire.parse_request(zds_wire.add(WORKLOAD), 2)
    with pytest.raises(zds_wire.ZdsWireError, match="unexpected file descriptors"):
        zds_wire.parse_request(zds_wire.delete("d"), 1)


def test_bad_packets() -> None:
    with pytest.raises(zds_wire.ZdsWireError):
        zds_wire.parse_request(b"\xff\xff\xff", 0)
    with pytest.raises(zds_wire.ZdsWireError, match="without a payload"):
        zds_wire.parse_request(b"", 0)
    with pytest.raises(zds_wire.ZdsWireError, match="without an ack"):
        zds_wire.parse_ack(b"")
    with pytest.raises(zds_wire.ZdsWireError, match="packet limit"):
        zds_wire.add(WorkloadInfo(uid="u", name="n" * 600, namespace="s" * 500))
