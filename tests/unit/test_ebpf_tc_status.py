"""Parsing the netlink dumps that tell which TC filters are on a pod's interfaces (pure)."""

from __future__ import annotations

import struct

from node_agent.backends.ebpf import tc, tc_foreign, tc_status


def attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def link(index: int, name: str) -> tuple[int, bytes]:
    return tc_status.RTM_NEWLINK, tc_status.IFINFOMSG.pack(0, 1, index, 0, 0) + attr(3, name.encode() + b"\0")


def bpf_filter(parent: int, name: str, prog_id: int, kind: str = "bpf", classid: int = 1) -> tuple[int, bytes]:
    opts = attr(tc_status.TCA_BPF_NAME, name.encode() + b"\0") + attr(tc_status.TCA_BPF_ID, struct.pack("=I", prog_id))
    opts += attr(tc_status.TCA_BPF_CLASSID, struct.pack("=I", classid))
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


def any_filter(parent: int, kind: str, prio: int, handle: int, chain: int | None = None) -> tuple[int, bytes]:
    body = attr(tc_status.TCA_KIND, kind.encode() + b"\0")
    if chain is not None:
        body += attr(tc_status.TCA_CHAIN, struct.pack("=I", chain))
    return tc_status.RTM_NEWTFILTER, tc_status.TCMSG.pack(0, 2, handle, parent, (prio << 16) | 0x0300) + body


def test_records_carry_priority_handle_and_chain():
    dump = [bpf_filter(tc.INGRESS_PARENT, "hr_tc_ingress", 41), any_filter(tc.INGRESS_PARENT, "matchall", 1, 1, 0),
            any_filter(tc.INGRESS_PARENT, "u32", 3, 0x800, 7)]
    recs = tc_status.records_of(dump, tc.INGRESS_PARENT)
    assert [(r.kind, r.prio, r.handle, r.chain) for r in recs] == [
        ("bpf", tc.HR_PRIO, 1, 0), ("matchall", 1, 1, 0), ("u32", 3, 0x800, 7)]


def test_records_carry_the_bpf_filters_classid():
    recs = tc_status.records_of([bpf_filter(tc.EGRESS_PARENT, "hr_tc_egress", 42, classid=0x278EF)], tc.EGRESS_PARENT)
    assert [(r.name, r.prog_id, r.classid) for r in recs] == [("hr_tc_egress", 42, 0x278EF)]


def test_foreign_ahead_of_ours():
    ours = tc_foreign.TcFilter("bpf", tc.HR_PRIO, tc.HR_HANDLE, name="hr_tc_ingress", prog_id=41)
    lower = tc_foreign.TcFilter("matchall", 1, 1)
    same_pref_other_handle = tc_foreign.TcFilter("bpf", tc.HR_PRIO, 2, name="cilium", prog_id=9)
    same_pref_header = tc_foreign.TcFilter("bpf", tc.HR_PRIO, 0)
    after = tc_foreign.TcFilter("u32", tc.HR_PRIO + 1, 0x800)
    other_chain = tc_foreign.TcFilter("u32", 1, 0x800, chain=3)
    impostor = tc_foreign.TcFilter("bpf", tc.HR_PRIO, tc.HR_HANDLE, name="not_ours", prog_id=5)
    got = tc_foreign.ahead_of_ours([ours, lower, same_pref_other_handle, same_pref_header, after, other_chain,
                                    impostor], "hr_tc_ingress")
    assert got == [lower, same_pref_other_handle, impostor]
    found = tc_foreign.foreign_of(tc.INGRESS, "eth0", 2, [ours, lower], [(77, 0), (78, 12)], "hr_tc_ingress")
    assert [tc_foreign.label(x.item) for x in found] == [
        "tcx program id 77", "tcx program id 78 (link id 12)", "matchall filter pref 1 handle 0x1"]
    assert tc_foreign.describe(tc.INGRESS, "eth0", [ours], [], "hr_tc_ingress") == []
