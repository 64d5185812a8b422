"""Pure parts of the node's pod parameters (pod_index): the keys the node-wide programs look a pod up by."""

from __future__ import annotations

import ipaddress
import struct

from node_agent.backends.ebpf import loader, maps, pod_index

from cni.contract.spec import SidecarSpec

COOKIE = 0x1122_3344_5566_7788


def test_with_netns_names_the_netns_and_leaves_the_rest():
    pm = maps.pod_maps(SidecarSpec(), cgroup_id=5, ips=("10.1.0.2/24",))
    named = maps.with_netns(pm, COOKIE, 4026532999, 0x7A46)
    before, after = maps.unpack_config(pm.config), maps.unpack_config(named.config)
    assert before["netns_cookie"] == before["netns_ino"] == before["tc_slot"] == 0
    assert after["netns_cookie"] == COOKIE
    assert (after["netns_cookie_lo"], after["netns_cookie_hi"]) == (0x5566_7788, 0x1122_3344)
    assert after["netns_ino"] == 4026532999
    assert after["tc_slot"] == 0x7A46
    ours = ("netns", "tc_slot")
    assert {k: v for k, v in after.items() if not k.startswith(ours)} == {
        k: v for k, v in before.items() if not k.startswith(ours)
    }
    assert named.generation == pm.generation  # the netns is not part of the spec hash


def test_port_keys_carry_netns_generation_and_kind():
    node_map, key = pod_index.node_key("hr_cfg_xports", struct.pack("=H", 9090), COOKIE, 77)
    assert node_map == "hr_pod_ports"
    assert len(key) == 24  # struct hr_port_key
    assert struct.unpack("=QQHHI", key) == (COOKIE, 77, 9090, 1, 0)
    assert pod_index.node_key("hr_cfg_oports", struct.pack("=H", 9090), COOKIE, 77)[1] != key


def test_net_keys_put_the_range_after_160_bits_of_pod():
    pod_key = maps.lpm_key(ipaddress.ip_network("10.9.0.0/16"))
    node_map, key = pod_index.node_key("hr_cfg_xnets", pod_key, COOKIE, 77)
    assert node_map == "hr_pod_nets"
    assert len(key) == 40  # struct hr_net_key
    prefixlen, netns, gen, kind, addr = struct.unpack("=IQQI16s", key)
    assert (prefixlen, netns, gen, kind) == (160 + 96 + 16, COOKIE, 77, 1)
    assert addr == b"\0" * 10 + b"\xff\xff" + bytes([10, 9, 0, 0])
    names = ("hr_cfg_xnets", "hr_cfg_inets", "hr_cfg_local")
    kinds = {pod_index.node_key(name, pod_key, COOKIE, 77)[1][20:24] for name in names}
    assert len(kinds) == 3


def test_sets_cover_every_pod_set_the_cgroup_programs_read():
    pm = maps.pod_maps(SidecarSpec(exclude_outbound_ports=(22,), include_outbound_ports=(80,)), 1, ips=("10.1.0.2",))
    sets = pod_index.sets_of(pm)
    assert set(sets) == set(pod_index.SETS)
    assert set(sets) < set(loader.POD_MAPS)
    assert sets["hr_cfg_xports"] == (struct.pack("=H", 22),)
    assert sets["hr_cfg_oports"] == (struct.pack("=H", 80),)
    assert len(sets["hr_cfg_local"]) == 1
    assert set(loader.INDEX_MAPS) == {pod_index.CONFIG, pod_index.PORTS, pod_index.NETS, pod_index.TC}
    assert sets["hr_cfg_xin"] and sets["hr_cfg_iin"] == ()  # inbound: every port but the proxy's own
    port_sets = [name for name, (node_map, _kind) in pod_index.SETS.items() if node_map == pod_index.PORTS]
    assert {pod_index.node_key(name, struct.pack("=H", 1), COOKIE, 1)[1][18:20] for name in port_sets} == {
        struct.pack("=H", kind) for kind in (1, 2, 3, 4)}  # HR_SET_XPORTS, _OPORTS, _XIN, _IIN


def test_tc_slots_start_spread_by_cookie_within_16_bits():
    assert pod_index.first_slot(0) == 1 and pod_index.first_slot(0xFFFE) == 0xFFFF
    assert pod_index.first_slot(0xFFFF) == 1  # slot 0 means "no slot"
    start = 162000 % 0xFFFF + 1
    assert {pod_index.first_slot(c) for c in range(162000, 162250)} == set(range(start, start + 250))


def test_a_specs_maps_are_made_once_and_named_per_pod():
    spec = SidecarSpec(exclude_outbound_ports=(22,))
    pm = maps.spec_maps(spec, True, ("10.1.0.2/24",))
    assert maps.spec_maps(spec, True, ("10.1.0.2/24",)) is pm  # remembered
    assert maps.unpack_config(pm.config)["cgroup_id"] == 0
    named = maps.with_netns(pm, COOKIE, 4026532999, 0, 77)
    assert maps.unpack_config(named.config)["cgroup_id"] == 77
    assert named.config == maps.with_netns(maps.pod_maps(spec, 77, ips=("10.1.0.2/24",)), COOKIE, 4026532999).config
    assert maps.wanted_generation(spec, True, ("10.1.0.2/24",)) == named.generation
