"""eBPF: the cgroup and TC programs are loaded once per node and find each pod's parameters in the node
maps by the pod netns' cookie (TC: by the pod's TC slot, its filters' classid). Pods share the programs and
keep their own parameters; a spec change switches to the new generation and drops the old entries; a lost
entry, a TC filter of another slot, or a pod in a new netns, is drift the apply repairs."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from node_agent.backends.base import BackendError, PodTarget

from cni.contract.spec import SidecarSpec
from tests.kernel.ebpf_fixtures import PodEnv, drop_node_config_entries, ebpf_backend, pod_env, removed_after, suffix

pytestmark = [pytest.mark.kernel, pytest.mark.ebpf]

if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)
pytest.importorskip("bcc")

from node_agent.backends.ebpf import bpfsys, loader, pinning, pod_index, tc  # noqa: E402
from node_agent.backends.ebpf.backend import EbpfBackend  # noqa: E402
from node_agent.kernel.netns_runner import run_in_netns  # noqa: E402

SIDECAR_OUT = SidecarSpec(include_inbound_ports=())


@pytest.fixture
def env(tmp_path: Path) -> Iterator[PodEnv]:
    yield from pod_env(tmp_path)


@pytest.fixture
def env2(tmp_path: Path) -> Iterator[PodEnv]:
    (tmp_path / "second").mkdir()
    yield from pod_env(tmp_path / "second")


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[EbpfBackend]:
    yield from ebpf_backend(tmp_path / "state")


@pytest.fixture
def target(env: PodEnv, backend: EbpfBackend) -> Iterator[PodTarget]:
    yield from removed_after(env, backend)


def start_proxy_and_server(env: PodEnv) -> None:
    env.start_server(env.pod_ns, 15001, "proxy", cgroup=env.cgroup)
    env.start_server(env.peer_ns, 8080, "server")
    env.start_server(env.peer_ns, 9090, "server9090")


def node_keys(backend: EbpfBackend, name: str) -> list[bytes]:
    size = {pod_index.CONFIG: 8, pod_index.PORTS: pod_index.PORT_KEY.size, pod_index.NETS: pod_index.NET_KEY.size,
            pod_index.TC: 4}
    fd = pinning.open_pinned(backend.state_dir / "bpf" / pinning.NODE_DIR / name)
    assert fd is not None
    try:
        return bpfsys.map_keys(fd, size[name])
    finally:
        os.close(fd)


def attached_ids(cg: Path) -> list[int]:
    res = subprocess.run(["bpftool", "-j", "cgroup", "show", str(cg)], capture_output=True, text=True, check=True)
    return sorted(int(p["id"]) for p in json.loads(res.stdout or "[]"))


def test_pods_share_the_programs_and_keep_their_own_parameters(env, env2, backend):
    start_proxy_and_server(env)
    start_proxy_and_server(env2)
    a, b = env.target(), env2.target()
    try:
        backend.apply(a, dataclasses.replace(SIDECAR_OUT, exclude_outbound_ports=(8080,)))
        backend.apply(b, SIDECAR_OUT)
        assert attached_ids(env.cgroup) == attached_ids(env2.cgroup) != []  # the same programs
        assert env.connect(env.peer_v4, 8080)["reply"]["name"] == "server"  # excluded in pod a only
        assert env2.connect(env2.peer_v4, 8080)["reply"]["name"] == "proxy"
        assert env.connect(env.peer_v4, 9090)["reply"]["name"] == "proxy"
        assert len(node_keys(backend, pod_index.CONFIG)) == 2
    finally:
        backend.remove(a)
        backend.remove(b)
    assert node_keys(backend, pod_index.CONFIG) == []
    assert node_keys(backend, pod_index.PORTS) == node_keys(backend, pod_index.NETS) == []


def test_spec_change_switches_generation_and_drops_the_old_entries(env, backend, target):
    start_proxy_and_server(env)
    first = dataclasses.replace(SIDECAR_OUT, exclude_outbound_ports=(8080, 8081))
    second = dataclasses.replace(SIDECAR_OUT, exclude_outbound_ports=(9090,))
    backend.apply(target, first)
    assert env.connect(env.peer_v4, 8080)["reply"]["name"] == "server"
    assert env.connect(env.peer_v4, 9090)["reply"]["name"] == "proxy"
    backend.apply(target, second)
    assert env.connect(env.peer_v4, 8080)["reply"]["name"] == "proxy"
    assert env.connect(env.peer_v4, 9090)["reply"]["name"] == "server9090"
    (key,) = node_keys(backend, pod_index.CONFIG)
    cfg = pod_index.read_config_raw(backend.state_dir / "bpf" / target.uid)
    assert cfg is not None
    generation = struct.unpack_from("=Q", cfg, 24)[0]  # hr_config.generation
    ports = [pod_index.PORT_KEY.unpack(k) for k in node_keys(backend, pod_index.PORTS)]
    assert {(netns, gen) for netns, gen, _port, _kind, _pad in ports} == {(struct.unpack("=Q", key)[0], generation)}
    assert [port for _netns, _gen, port, kind, _pad in ports if kind == 1] == [9090]  # HR_SET_XPORTS
    assert {pod_index.NET_KEY.unpack(k)[2] for k in node_keys(backend, pod_index.NETS)} == {generation}
    pdir = backend.state_dir / "bpf" / target.uid
    assert (pdir / "hr_cfg_xports").exists()
    backend.apply(target, SIDECAR_OUT)  # no exclusion left: the set's pin goes, and its entries
    assert not (pdir / "hr_cfg_xports").exists() and (pdir / "hr_cfg").exists()
    assert [k for k in node_keys(backend, pod_index.PORTS) if pod_index.PORT_KEY.unpack(k)[3] == 1] == []
    assert env.connect(env.peer_v4, 9090)["reply"]["name"] == "proxy"


def test_lost_node_entry_is_drift_and_repaired(env, backend, target):
    start_proxy_and_server(env)
    backend.apply(target, SIDECAR_OUT)
    drop_node_config_entries(backend.state_dir)
    assert env.connect(env.peer_v4, 8080)["reply"]["name"] == "server"  # the programs find no parameters
    assert any("no entry in the node's eBPF pod config map" in p for p in backend.check(target, SIDECAR_OUT))
    backend.apply(target, SIDECAR_OUT)
    assert backend.check(target, SIDECAR_OUT) == []
    assert env.connect(env.peer_v4, 8080)["reply"]["name"] == "proxy"


def test_pod_in_a_new_netns_is_drift_and_its_entries_move(env, backend, target):
    backend.apply(target, SIDECAR_OUT)
    (old_key,) = node_keys(backend, pod_index.CONFIG)
    ns = f"hr-ebpf-new-{suffix()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        moved = dataclasses.replace(target, netns_path=f"/run/netns/{ns}")
        assert any("another netns" in p for p in backend.check(moved, SIDECAR_OUT))
        backend.apply(moved, SIDECAR_OUT)
        assert backend.check(moved, SIDECAR_OUT) == []
        cookie = run_in_netns(moved.netns_path, tc.netns_cookie_here)
        assert node_keys(backend, pod_index.CONFIG) == [struct.pack("=Q", cookie)]
        assert node_keys(backend, pod_index.CONFIG) != [old_key]
        backend.remove(moved)
        assert node_keys(backend, pod_index.CONFIG) == []
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_node_maps_made_again_get_programs_loaded_against_them(env, backend, target):
    """Someone unpins the node maps: the pod's programs keep the maps they were loaded with, the check sees
    the pod missing from the new ones, and the repair loads the programs again against the new maps (a spec
    change after it takes effect)."""
    start_proxy_and_server(env)
    backend.apply(target, SIDECAR_OUT)
    node_dir = backend.state_dir / "bpf" / pinning.NODE_DIR
    for name in loader.NODE_MAPS:
        pinning.unpin(node_dir / name)
    assert env.connect(env.peer_v4, 8080)["reply"]["name"] == "proxy"
    assert backend.check(target, SIDECAR_OUT) != []
    backend.apply(target, SIDECAR_OUT)
    assert backend.check(target, SIDECAR_OUT) == []
    changed = dataclasses.replace(SIDECAR_OUT, exclude_outbound_ports=(8080,))
    backend.apply(target, changed)
    assert env.connect(env.peer_v4, 8080)["reply"]["name"] == "server"
    assert env.connect(env.peer_v4, 9090)["reply"]["name"] == "proxy"


def tc_filter_ids(env: PodEnv, hook: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", env.pod_ns, "tc", "-j", "filter", "show", "dev", "eth0", hook],
                         capture_output=True, text=True, check=True).stdout
    return sorted(f"{f['options'].get('prog', {}).get('id')}@{f['options'].get('flowid', '')}"
                  for f in json.loads(out or "[]") if "options" in f)


def program_freed(prog_id: int, timeout: float = 5.0) -> bool:
    """Programs are freed asynchronously (RCU): poll until the id is gone."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
        if prog_id not in {p["id"] for p in json.loads(out or "[]")}:
            return True
        time.sleep(0.1)
    return False


def start_inbound(env: PodEnv) -> None:
    env.start_server(env.pod_ns, 15006, "inbound-proxy", cgroup=env.cgroup)
    env.start_server(env.pod_ns, 8080, "app", cgroup=env.cgroup)


def test_pods_share_the_tc_programs_each_under_its_own_slot(env, env2, backend):
    start_inbound(env)
    start_inbound(env2)
    a, b = env.target(), env2.target()
    try:
        backend.apply(a, SidecarSpec())
        backend.apply(b, dataclasses.replace(SidecarSpec(), exclude_inbound_ports=(8080,)))
        ids_a, ids_b = tc_filter_ids(env, "ingress"), tc_filter_ids(env2, "ingress")
        assert [i.split("@")[0] for i in ids_a] == [i.split("@")[0] for i in ids_b]  # one program
        assert ids_a != ids_b  # two slots
        assert len(node_keys(backend, pod_index.TC)) == 2
        assert env.connect_from_peer(env.pod_v4, 8080)["reply"]["name"] == "inbound-proxy"
        assert env2.connect_from_peer(env2.pod_v4, 8080)["reply"]["name"] == "app"  # excluded in pod b only
    finally:
        backend.remove(a)
        backend.remove(b)
    assert node_keys(backend, pod_index.TC) == []


def test_a_lost_slot_or_a_filter_of_another_slot_is_drift_and_repaired(env, backend, target):
    start_inbound(env)
    backend.apply(target, SidecarSpec())
    (slot_key,) = node_keys(backend, pod_index.TC)
    slot = struct.unpack("=I", slot_key)[0]
    fd = pinning.open_pinned(backend.state_dir / "bpf" / pinning.NODE_DIR / pod_index.TC)
    assert fd is not None
    try:
        bpfsys.map_delete(fd, slot_key)
    finally:
        os.close(fd)
    assert env.connect_from_peer(env.pod_v4, 8080)["reply"]["name"] == "app"  # the programs find no pod
    assert any(f"TC slot {slot} is not the pod's" in p for p in backend.check(target, SidecarSpec()))
    backend.apply(target, SidecarSpec())
    assert backend.check(target, SidecarSpec()) == []
    assert env.connect_from_peer(env.pod_v4, 8080)["reply"]["name"] == "inbound-proxy"
    pinned = backend.state_dir / "bpf" / target.uid / "hr_tc_ingress"  # the node's program, pinned for the pod
    subprocess.run(["ip", "netns", "exec", env.pod_ns, "tc", "filter", "replace", "dev", "eth0", "ingress",
                    "pref", str(tc.HR_PRIO), "handle", "1", "bpf", "da", "object-pinned", str(pinned),
                    "classid", ":9"], check=True)
    assert env.connect_from_peer(env.pod_v4, 8080)["reply"]["name"] == "app"  # slot 9 is no pod's
    assert any("has classid 0x9" in p for p in backend.check(target, SidecarSpec()))
    backend.apply(target, SidecarSpec())
    assert backend.check(target, SidecarSpec()) == []
    assert env.connect_from_peer(env.pod_v4, 8080)["reply"]["name"] == "inbound-proxy"



def test_a_pod_with_its_own_tc_programs_is_left_until_its_spec_changes(env, backend, target):
    """As after an upgrade from a build that loaded TC programs per pod (or a pod that found no slot): such
    a pod is intact; its next spec change moves it to the node's TC programs and frees its own."""
    start_inbound(env)
    backend.node_tc = False
    backend.apply(target, SidecarSpec())
    (own,) = {i.split("@")[0] for i in tc_filter_ids(env, "ingress")}
    assert node_keys(backend, pod_index.TC) == []
    backend.node_tc = True
    assert backend.check(target, SidecarSpec()) == []
    assert env.connect_from_peer(env.pod_v4, 8080)["reply"]["name"] == "inbound-proxy"
    changed = dataclasses.replace(SidecarSpec(), exclude_inbound_ports=(9999,))
    backend.apply(target, changed)
    assert backend.check(target, changed) == []
    (slot_key,) = node_keys(backend, pod_index.TC)
    slot = struct.unpack("=I", slot_key)[0]
    ids = tc_filter_ids(env, "ingress")  # the node's program now, under the pod's slot
    assert ids and all(i.split("@")[0] != own and i.endswith(f":{slot:x}") for i in ids)
    assert program_freed(int(own))
    assert env.connect_from_peer(env.pod_v4, 8080)["reply"]["name"] == "inbound-proxy"


def test_a_second_pod_in_the_same_netns_is_refused(env, env2, backend, target):
    start_proxy_and_server(env)
    backend.apply(target, SIDECAR_OUT)
    intruder = dataclasses.replace(env2.target(), netns_path=target.netns_path)  # its own cgroup, pod a's netns
    with pytest.raises(BackendError, match="already carries the eBPF redirection of the pod in cgroup id"):
        backend.apply(intruder, dataclasses.replace(SIDECAR_OUT, exclude_outbound_ports=(8080,)))
    assert not backend.installed(intruder)
    assert backend.check(target, SIDECAR_OUT) == []  # pod a's parameters untouched
    assert env.connect(env.peer_v4, 8080)["reply"]["name"] == "proxy"


def test_a_pin_directory_that_cannot_be_made_leaves_no_tc_slot_taken(env, backend, target, monkeypatch):
    """The pod's pin directory cannot be made (a full or read-only bpffs): the apply fails, and the TC slot
    it had just taken is free again; the next apply takes one and redirects."""
    real_mkdir = Path.mkdir

    def refused(self: Path, *args: object, **kwargs: object) -> None:
        if self.name == target.uid:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(BackendError, match="No space left"):
        backend.apply(target, SidecarSpec())
    assert node_keys(backend, pod_index.TC) == []
    monkeypatch.undo()
    start_inbound(env)
    backend.apply(target, SidecarSpec())
    assert len(node_keys(backend, pod_index.TC)) == 1
    assert env.connect_from_peer(env.pod_v4, 8080)["reply"]["name"] == "inbound-proxy"


def test_the_node_programs_kept_open_are_let_go_at_close(env, env2, backend):
    """The backend keeps the node's programs open between applies (a second pod's apply reuses them, no
    pin opened again); its close lets go of them, so the last pod's removal and the agent's shutdown leave
    no program behind."""
    a, b = env.target(), env2.target()
    backend.apply(a, SIDECAR_OUT)
    backend.apply(b, SIDECAR_OUT)  # served from the programs kept open
    backend.apply(env.target(), dataclasses.replace(SIDECAR_OUT, exclude_outbound_ports=(22,)))
    progs = attached_ids(env.cgroup)
    assert progs == attached_ids(env2.cgroup)
    backend.remove(a)
    backend.remove(b)
    backend.close()
    assert all(program_freed(pid) for pid in progs)


def test_the_load_threads_an_apply_starts_live_in_the_agents_netns(env, backend, target, monkeypatch):
    """The apply stays in the pod netns; the program-load threads it starts there go home first (a thread
    left in a pod netns keeps that netns alive after the pod is gone)."""
    from node_agent.backends.ebpf import program_loads

    monkeypatch.setattr(program_loads, "_pool", None)  # a pool made by this apply, from the pod netns
    backend.node_tc = False  # the pod's own TC programs: loaded on the pool
    backend.apply(target, SidecarSpec())
    own = os.stat("/proc/self/ns/net").st_ino
    pool = program_loads._pool
    assert pool is not None
    loaders = {str(t.native_id) for t in pool._threads}
    assert loaders and all(os.stat(f"/proc/self/task/{tid}/ns/net").st_ino == own for tid in loaders)
    pool.shutdown()


def test_prepare_makes_the_node_maps_and_both_modes_programs_before_any_pod(env, backend, target, monkeypatch):
    """`prepare` (the agent runs it at start) makes the node maps and loads and pins the node programs of
    both pod modes; the first pod's apply then loads nothing and attaches those programs, and traffic goes
    through them. A backend already closed prepares nothing (no bpffs mounted again at shutdown)."""
    from node_agent.backends.ebpf import cgroup_programs, node_programs, pod_state, program_loads

    backend.prepare()
    node_dir = backend.state_dir / "bpf" / pinning.NODE_DIR
    assert all((node_dir / name).exists() for name in loader.NODE_MAPS)
    (progs,) = node_dir.glob("progs-*")
    wanted = {loader.function_of(n, False, node=True)
              for n in (*cgroup_programs.SIDECAR_PROGRAMS, *cgroup_programs.TCP_PROGRAMS, *pod_state.TC_NAMES)}
    wanted |= {loader.function_of(n, True, node=True)
               for n in (*cgroup_programs.TCP_PROGRAMS, *cgroup_programs.DNS_PROGRAMS)}
    assert {p.name for p in progs.iterdir()} == wanted
    pinned_ids = set()
    for p in progs.iterdir():
        fd = pinning.open_pinned(p)
        assert fd is not None
        pinned_ids.add(bpfsys.prog_info(fd).prog_id)
        os.close(fd)
    loads: list[object] = []

    def counted(obj: loader.CompiledObject, fds: dict[str, int], names: Sequence[str], *, ambient: bool,
                node: bool = False) -> dict[str, int]:
        loads.append(names)
        return program_loads.load_programs(obj, fds, names, ambient=ambient, node=node)

    monkeypatch.setattr(node_programs, "load_programs", counted)
    start_proxy_and_server(env)
    backend.apply(target, SIDECAR_OUT)
    assert loads == []
    assert set(attached_ids(env.cgroup)) <= pinned_ids
    assert env.connect(env.peer_v4, 8080)["reply"]["name"] == "proxy"

    closed = EbpfBackend(backend.state_dir.parent / "closed")
    closed.close()
    try:
        closed.prepare()
        assert not os.path.ismount(closed.state_dir / "bpf")
    finally:
        pinning.unmount_bpffs(closed.state_dir)


def test_node_maps_replaced_in_the_tick_of_a_check_are_not_taken_for_the_same(env, backend, target):
    """bpffs takes file times from the coarse clock: a node map pin made again in the same tick as the check
    that last looked at the node directory leaves its mtime as that check saw it; the fds opened from the
    earlier pin are not taken for the pinned map on that word."""
    backend.apply(target, SIDECAR_OUT)
    root = backend.state_dir / "bpf"
    ndir = root / pinning.NODE_DIR
    config, touch = ndir / pod_index.CONFIG, ndir / "hrtest_touch"
    for _ in range(50):  # a change, a check and the pin made again in one tick (retried until they are)
        backend._node_maps(root)  # the fds opened from the pins as they are now
        spare = pinning.open_pinned(config)
        assert spare is not None
        try:
            bpfsys.obj_pin(spare, str(touch))  # something pinned in the node directory
            touched = os.stat(ndir).st_mtime_ns
            assert backend.node_maps.current(root) is not None  # a check that sees that change
            os.unlink(config)
            bpfsys.obj_pin(spare, str(config))  # the config map's pin made again: another file
            same_tick = os.stat(ndir).st_mtime_ns == touched
        finally:
            os.close(spare)
        if same_tick:
            break
        os.unlink(touch)
    else:
        pytest.fail("no change, check and new pin in one tick in 50 tries")
    assert backend.node_maps.current(root) is None
    os.unlink(touch)
