"""The raw rtnetlink requests that put our TC programs on a pod interface (tc_attach): what they ask for."""

from __future__ import annotations

import struct

from node_agent.backends.ebpf import tc, tc_attach
from node_agent.backends.ebpf.tc_status import TCMSG

from cni.netlink import netlink_parse


def parse(raw: bytes) -> tuple[tuple[int, int, int, int, int], tuple[int, ...], dict[int, bytes]]:
    length, msg_type, flags, seq, pid = netlink_parse.NLMSGHDR.unpack_from(raw)
    assert length == len(raw)
    body = raw[netlink_parse.NLMSGHDR.size :]
    attrs = dict(netlink_parse.attributes(body[TCMSG.size :]))
    return (length, msg_type, flags, seq, pid), TCMSG.unpack_from(body), attrs


def test_clsact_is_created_only_where_none_is():
    (_, msg_type, flags, seq, _), (_family, index, handle, parent, _info), attrs = parse(tc_attach.clsact_request(7, 3))
    assert (msg_type, seq, index) == (tc_attach.RTM_NEWQDISC, 3, 7)
    assert flags & tc_attach.NLM_F_EXCL and flags & tc_attach.NLM_F_CREATE and flags & tc_attach.NLM_F_ACK
    assert (handle, parent) == (0xFFFF0000, 0xFFFFFFF1)
    assert attrs[tc_attach.TCA_KIND] == b"clsact\0"


def test_filter_replaces_ours_in_place_as_direct_action_bpf():
    raw = tc_attach.filter_request(7, tc.EGRESS, 42, tc.FILTER_NAMES[tc.EGRESS], 4, 0x7A46)
    (_, msg_type, flags, _seq, _), (_family, index, handle, parent, info), attrs = parse(raw)
    assert msg_type == tc_attach.RTM_NEWTFILTER and index == 7
    assert flags & tc_attach.NLM_F_REPLACE and flags & tc_attach.NLM_F_CREATE and not flags & tc_attach.NLM_F_EXCL
    assert (handle, parent) == (tc.HR_HANDLE, tc.EGRESS_PARENT)
    assert info >> 16 == tc.HR_PRIO and struct.pack("=H", info & 0xFFFF) == b"\x00\x03"  # protocol all, network order
    assert attrs[tc_attach.TCA_KIND] == b"bpf\0"
    options = dict(netlink_parse.attributes(attrs[tc_attach.TCA_OPTIONS]))
    assert struct.unpack("=I", options[tc_attach.TCA_BPF_FD]) == (42,)
    assert options[tc_attach.TCA_BPF_NAME] == b"hr_tc_egress\0"
    assert struct.unpack("=I", options[tc_attach.TCA_BPF_FLAGS]) == (tc_attach.TCA_BPF_FLAG_ACT_DIRECT,)
    assert struct.unpack("=I", options[tc_attach.TCA_BPF_CLASSID]) == (0x7A46,)  # the pod's TC slot



def test_detach_deletes_our_filter_by_priority_handle_and_kind():
    (_, msg_type, flags, seq, _), (_family, index, handle, parent, info), attrs = parse(
        tc_attach.delete_request(3, tc.INGRESS, 9))
    assert (msg_type, seq, index) == (tc_attach.RTM_DELTFILTER, 9, 3)
    assert flags & tc_attach.NLM_F_ACK and not flags & (tc_attach.NLM_F_CREATE | tc_attach.NLM_F_REPLACE)
    assert (handle, parent, info >> 16) == (tc.HR_HANDLE, tc.INGRESS_PARENT, tc.HR_PRIO)
    assert attrs[tc_attach.TCA_KIND] == b"bpf\0"
