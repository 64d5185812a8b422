"""Parsing the netlink dumps that tell which TC filters are on a pod's interfaces (pure)."""

from __future__ import annotations

import struct

from node_agent.backends.ebpf import tc, tc_status


def attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def link(index: int, name: str) -> tuple[int, bytes]:
    return tc_status.RTM_NEWLINK, tc_status.IFINFOMSG.pack(0, 1, index, 0, 0) + attr(3, name.encode() + b"\0")


def bpf_filter(parent: int, name: str, prog_id: int, kind: str = "bpf") -> tuple[int, bytes]:
    opts = attr(tc_status.TCA_BPF_NAME, name.encode() + b"\0") + attr(tc_status.TCA_BPF_ID, struct.pack("=I", prog_id))
    body = attr(tc_status.TCA_KIND, kind.encode() + b"\0") + attr(tc_status.TCA_OPTIONS | 0x8000, opts)
    return tc_status.RTM_NEWTFILTER, tc_status.TCMSG.pack(0, 2, 1, parent, (0x4852 << 16) | 0x0300) + body


def test_links_without_loopback():
    dump = [link(1, "lo"), link(2, "eth0"), link(5, "net1"), (99, b"")]
    assert tc_status.links_of(dump) == [(2, "eth0"), (5, "net1")]


def test_filters_of_one_parent_with_names_and_ids():
    dump = [
        bpf_filter(tc.INGRESS_PARENT, "hr_tc_ingress", 41),
        bpf_filter(tc.EGRESS_PARENT, "hr_tc_egress", 42),
        bpf_filter(tc.INGRESS_PARENT, "cilium_ingress", 7),
        bpf_filter(tc.INGRESS_PARENT, "", 0, kind="u32"),
        (tc_status.RTM_NEWTFILTER, b"\0" * 4),  # too short: skipped
    ]
    assert tc_status.filters_of(dump, tc.INGRESS_PARENT) == [("hr_tc_ingress", 41), ("cilium_ingress", 7)]
    assert tc_status.filters_of(dump, tc.EGRESS_PARENT) == [("hr_tc_egress", 42)]
