"""Pure parts of the eBPF backend: spec -> map entries, inbound split, relocations, names."""

from __future__ import annotations

import dataclasses
import ipaddress
import struct

import pytest
from node_agent.backends.ebpf import loader, maps, pinning

from cni.contract.spec import AmbientSpec, SidecarSpec


def test_sidecar_config_layout():
    pm = maps.pod_maps(SidecarSpec(exclude_outbound_ports=(9090, 22, 22)), cgroup_id=77)
    cfg = maps.unpack_config(pm.config)
    assert len(pm.config) == maps.CONFIG_SIZE == 104
    assert cfg["hbone_port"] == 15008  # the proxy's own connections to its pod IP:15008 are not captured
    assert cfg["self_ip4"] == 0  # no pod IPs: outbound falls back to loopback
    assert cfg["proxy_gid"] == 1337
    assert cfg["mode"] == maps.MODE_SIDECAR
    assert cfg["proxy_uid"] == 1337
    assert cfg["outbound_port"] == 15001
    assert cfg["include_all4"] == cfg["include_all6"] == 1
    assert cfg["capture_dns"] == 0
    assert cfg["cgroup_id"] == 77
    assert cfg["generation"] == pm.generation
    assert pm.exclude_ports == (struct.pack("=H", 22), struct.pack("=H", 9090))
    assert cfg["inbound_mode"] == maps.INBOUND_ALL and cfg["inbound_port"] == 15006
    assert pm.exclude_inbound == tuple(struct.pack("=H", p) for p in (15008, 15020, 15021, 15090))
    assert pm.include_ports == ()
    assert cfg["probe_src4"] == 0


def test_inbound_modes():
    excluded = (15008, 15020, 15021, 15090)  # 15008 (HBONE) is never captured
    assert maps.inbound_ports(SidecarSpec(include_inbound_ports=())) == (maps.INBOUND_NONE, excluded, ())
    listed = maps.inbound_ports(SidecarSpec(include_inbound_ports=(8080, 80)))
    assert listed == (maps.INBOUND_LISTED, excluded, (80, 8080))
    amb = maps.inbound_ports(AmbientSpec(exclude_inbound_ports=(22,)))
    assert amb == (maps.INBOUND_ALL, (22, 15008), ())
    off = maps.unpack_config(maps.pod_maps(SidecarSpec(), 1, inbound_in_ebpf=False).config)
    assert off["inbound_mode"] == maps.INBOUND_NONE
    assert (
        maps.pod_maps(SidecarSpec(), 1, inbound_in_ebpf=False).generation != maps.pod_maps(SidecarSpec(), 1).generation
    )


def test_ambient_config_mark_and_dns():
    pm = maps.pod_maps(AmbientSpec(capture_dns=True), cgroup_id=1)
    cfg = maps.unpack_config(pm.config)
    assert cfg["mode"] == maps.MODE_AMBIENT
    assert (cfg["mark"], cfg["mark_mask"]) == (0x539, 0xFFF)
    assert cfg["proxy_uid"] == 0xFFFFFFFF  # no uid bypass in ambient
    assert (cfg["capture_dns"], cfg["dns_port"]) == (1, 15053)
    assert cfg["probe_src4"].to_bytes(4, "little") == bytes([169, 254, 7, 127])
    assert pm.config[48:64] == AmbientSpec().probe_snat_v6.packed


def test_lpm_keys_map_ipv4_into_v6_space():
    k4 = maps.lpm_key(ipaddress.ip_network("10.1.0.0/16"))
    assert struct.unpack("=I", k4[:4])[0] == 96 + 16
    assert k4[4:] == b"\0" * 10 + b"\xff\xff" + bytes([10, 1, 0, 0])
    k6 = maps.lpm_key(ipaddress.ip_network("fd00::/8"))
    assert struct.unpack("=I", k6[:4])[0] == 8
    assert k6[4:] == ipaddress.ip_address("fd00::").packed


def test_include_ranges():
    spec = SidecarSpec(include_outbound_ranges=(ipaddress.ip_network("10.0.0.0/8"),))
    pm = maps.pod_maps(spec, 1)
    cfg = maps.unpack_config(pm.config)
    assert (cfg["include_all4"], cfg["include_all6"]) == (0, 0)
    assert pm.include_nets == (maps.lpm_key(ipaddress.ip_network("10.0.0.0/8")),)
    none = maps.unpack_config(maps.pod_maps(SidecarSpec(include_outbound_ranges=()), 1).config)
    assert (none["include_all4"], none["include_all6"]) == (0, 0)
    star = SidecarSpec(include_outbound_ranges=(maps.ALL_V4,))
    assert maps.unpack_config(maps.pod_maps(star, 1).config)["include_all4"] == 1


def test_generation_stable_and_sensitive():
    a = maps.generation_of(SidecarSpec())
    assert a == maps.generation_of(SidecarSpec())
    assert a != maps.generation_of(SidecarSpec(exclude_outbound_ports=(1,)))
    assert a != maps.generation_of(AmbientSpec())
    assert 0 <= a < 2**63


def test_invalid_port_rejected():
    with pytest.raises(ValueError, match="port"):
        maps.pod_maps(SidecarSpec(exclude_outbound_ports=(0,)), 1)
    with pytest.raises(ValueError, match="outbound_port"):
        maps.pod_maps(SidecarSpec(outbound_port=70000), 1)


def test_inbound_split():
    assert maps.needs_inbound(SidecarSpec())
    assert maps.needs_inbound(SidecarSpec(include_inbound_ports=(8080,)))
    assert not maps.needs_inbound(SidecarSpec(include_inbound_ports=()))
    assert maps.needs_inbound(AmbientSpec())
    only = maps.inbound_only(SidecarSpec(exclude_outbound_ports=(5,)))
    assert isinstance(only, SidecarSpec)
    assert only.include_outbound_ranges == ()
    assert only.exclude_outbound_ports == (5,)
    amb = maps.inbound_only(AmbientSpec(capture_dns=True))
    assert isinstance(amb, AmbientSpec) and not amb.capture_dns
    for probe in ("1.2.3.4", "200.1.1.1", "::1", "fd00::1"):
        assert any(ipaddress.ip_address(probe) in n for n in amb.exclude_outbound_ranges)
    # everything inbound stays as it was
    assert dataclasses.replace(amb, exclude_outbound_ranges=(), capture_dns=True) == AmbientSpec(capture_dns=True)


def _insn(code: int, dst: int, src: int, off: int, imm: int) -> bytes:
    return struct.pack("=BBhi", code, (src << 4) | dst, off, imm)


def test_relocations_and_patch():
    insns = (
        _insn(0xB7, 0, 0, 0, 1)  # r0 = 1
        + _insn(0x18, 1, 1, 0, 42) + _insn(0, 0, 0, 0, 0)  # r1 = map fd 42 (two slots)
        + _insn(0x18, 2, 0, 0, 7) + _insn(0, 0, 0, 0, 0)  # r2 = imm64 7 (not a map)
        + _insn(0x95, 0, 0, 0, 0)
    )  # fmt: skip
    relocs = loader.relocations(insns, {42: "hr_cfg"})
    assert relocs == ((1, "hr_cfg"),)
    prog = loader.Program("p", 18, 10, insns, relocs)
    patched = prog.patched({"hr_cfg": 9})
    assert struct.unpack_from("=i", patched, 8 + 4)[0] == 9
    assert patched[:8] == insns[:8] and patched[16:] == insns[16:]
    with pytest.raises(loader.ToolchainError, match="unknown map"):
        loader.relocations(insns, {})


def test_program_table_is_consistent():
    assert set(loader.PROGRAMS) >= {"hr_connect4", "hr_connect6", "hr_sockops", "hr_getsockopt"}
    assert all(len(n) <= 15 for n in loader.PROGRAMS)  # kernel program names are 15 chars
    assert loader.bpf_source_dir().joinpath("redirect.c").is_file()


@pytest.mark.parametrize("uid", ["", "node", "../x", "a/b", "x" * 200])
def test_pod_dir_name_rejects(uid):
    with pytest.raises(pinning.PinError):
        pinning.pod_dir_name(uid)


def test_pod_dir_name_accepts_k8s_uid():
    assert pinning.pod_dir_name("3f1c2d4e-1111-2222-3333-444455556666") == "3f1c2d4e-1111-2222-3333-444455556666"


def test_pod_cgroup_of_pid(tmp_path):
    from node_agent.backends.ebpf.attach import cgroup2_path_of_pid, pod_cgroup_of_pid

    root = tmp_path / "cg2"
    uid = "1234-abcd"
    proc = tmp_path / "proc"
    (proc / "7").mkdir(parents=True)
    (proc / "7" / "cgroup").write_text(f"12:cpu:/x\n0::/kubepods/burstable/pod{uid}/ctr1\n")
    (proc / "8").mkdir()
    (proc / "8" / "cgroup").write_text("0::/\n")
    (proc / "9").mkdir()
    (proc / "9" / "cgroup").write_text("0::/kubepods.slice/kubepods-pod1234_abcd.slice/cri-x.scope\n")
    assert cgroup2_path_of_pid(7, proc, [root]) == root / f"kubepods/burstable/pod{uid}/ctr1"
    assert pod_cgroup_of_pid(7, uid, proc, [root]) == root / f"kubepods/burstable/pod{uid}"
    assert pod_cgroup_of_pid(7, None, proc, [root]) == root / f"kubepods/burstable/pod{uid}/ctr1"
    assert pod_cgroup_of_pid(9, uid, proc, [root]) == root / "kubepods.slice/kubepods-pod1234_abcd.slice"
    assert pod_cgroup_of_pid(8, uid, proc, [root]) is None  # the root: never
    assert pod_cgroup_of_pid(99, uid, proc, [root]) is None


def test_local_addresses_and_generation():
    pm = maps.pod_maps(SidecarSpec(), 1, ips=("10.1.2.3/24", "fd00::5", "10.1.2.3"))
    assert pm.local_addrs == (
        maps.lpm_key(ipaddress.ip_network("10.1.2.3/32")),
        maps.lpm_key(ipaddress.ip_network("fd00::5/128")),
    )
    assert pm.generation != maps.pod_maps(SidecarSpec(), 1).generation  # new IPs: re-apply
    assert pm.generation == maps.pod_maps(SidecarSpec(), 1, ips=("10.1.2.3", "fd00::5/64")).generation
    with pytest.raises(ValueError, match="pod IP"):
        maps.pod_maps(SidecarSpec(), 1, ips=("nonsense",))


def test_outbound_target_is_first_pod_ip_of_each_family():
    """connect4/6 redirect to the pod's own first IP of the family (so the source stays the pod IP)."""
    ips = ("fd00::5/64", "10.1.2.3/24", "10.9.9.9", "fd00::6")
    assert maps.self_addresses(ips) == (ipaddress.IPv4Address("10.1.2.3"), ipaddress.IPv6Address("fd00::5"))
    assert maps.self_addresses(("10.1.2.3",)) == (ipaddress.IPv4Address("10.1.2.3"), None)
    pm = maps.pod_maps(SidecarSpec(), 1, ips=ips)
    raw = struct.unpack(maps.CONFIG_FMT, pm.config)
    assert raw[-6] == int.from_bytes(bytes([10, 1, 2, 3]), "little")  # network order as the C reads it
    assert raw[-5] == ipaddress.IPv6Address("fd00::5").packed
    assert maps.unpack_config(pm.config)["self_ip4"] == raw[-6]
    # a different first address is a different installed config (re-applied, not adopted)
    other = maps.pod_maps(SidecarSpec(), 1, ips=("10.9.9.9", "10.1.2.3/24", "fd00::5/64", "fd00::6"))
    assert other.generation != pm.generation
    # an older, shorter config value still unpacks (so an upgraded agent sees a differing generation)
    assert maps.unpack_config(pm.config[:72])["generation"] == pm.generation
    with pytest.raises(ValueError, match="invalid pod IP"):
        maps.self_addresses(("nope",))


def test_include_outbound_ports_and_interface_fallback():
    spec = SidecarSpec(include_outbound_ports=(32000, 31000, 32000), include_outbound_ranges=())
    pm = maps.pod_maps(spec, 1)
    assert pm.include_ports == tuple(struct.pack("=H", p) for p in (31000, 32000))
    assert maps.unpack_config(pm.config)["include_all4"] == 0
    assert pm.generation != maps.pod_maps(SidecarSpec(include_outbound_ranges=()), 1).generation
    only = maps.inbound_only(spec)
    assert isinstance(only, SidecarSpec) and only.include_outbound_ports == ()
    assert maps.pod_maps(AmbientSpec(), 1).include_ports == ()
    reason = maps.interfaces_reason(SidecarSpec(exclude_interfaces=("net1",), kubevirt_interfaces=("eth1",)))
    assert "excludeInterfaces and kubevirtInterfaces" in reason and "iptables" in reason


def test_generation_is_pinned_so_an_upgrade_re_applies_no_pod():
    """A pinned config's generation is compared with the wanted one by every drift check: the same spec and
    IPs must keep giving the same number across releases (else every pod is applied again after one)."""
    assert maps.pod_maps(SidecarSpec(), 0, True, ("10.1.2.3",)).generation == 6079030082016018517
    assert maps.pod_maps(AmbientSpec(), 0, False, ("10.1.2.3/24", "fd00::5")).generation == 2529907797572805904


def test_pods_of_one_spec_differ_only_in_what_their_ips_make():
    a = maps.pod_maps(SidecarSpec(exclude_outbound_ports=(22,)), 5, True, ("10.1.2.3",))
    b = maps.pod_maps(SidecarSpec(exclude_outbound_ports=(22,)), 5, True, ("10.1.2.4", "fd00::4"))
    assert a.exclude_ports == b.exclude_ports == (struct.pack("=H", 22),)
    assert a.local_addrs != b.local_addrs and a.generation != b.generation
    ca, cb = maps.unpack_config(a.config), maps.unpack_config(b.config)
    differ = {k for k in ca if ca[k] != cb[k]}
    assert differ == {"generation", "families", "self_ip4"}  # (and self_ip6, which unpack_config leaves out)
    assert maps.pod_maps(SidecarSpec(exclude_outbound_ports=(22,)), 5, False, ("10.1.2.3",)).exclude_inbound == ()


def test_any_pod_dir_looks_for_a_directory_beside_the_node_one(tmp_path):
    assert not pinning.any_pod_dir(tmp_path)
    (tmp_path / pinning.NODE_DIR).mkdir()
    (tmp_path / "stray-file").write_text("")
    assert not pinning.any_pod_dir(tmp_path) and pinning.pod_dirs(tmp_path) == []
    (tmp_path / "3f1c2d4e-1111-2222-3333-444455556666").mkdir()
    assert pinning.any_pod_dir(tmp_path) and pinning.pod_dirs(tmp_path) == ["3f1c2d4e-1111-2222-3333-444455556666"]
