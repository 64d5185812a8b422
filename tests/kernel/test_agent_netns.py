"""Netns finder and pinning with real processes, real netns and real cgroup v2 directories."""

from __future__ import annotations

import os
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_agent.netns.finder import NetnsNotFound, find_pod_netns, scan
from node_agent.netns.pin import NetnsPins, PinError, RecycledNetns

from tests.kernel.agent_kit import PodProcs

pytestmark = pytest.mark.kernel


@pytest.fixture
def pods() -> Iterator[PodProcs]:
    p = PodProcs()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def pins(tmp_path: Path) -> Iterator[NetnsPins]:
    pn = NetnsPins(tmp_path / "netns")
    try:
        yield pn
    finally:
        for uid in list(pn.pinned()):
            pn.release(uid)


def ns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def test_finder_matches_pod_uid_in_cgroupfs_and_systemd_layouts(pods: PodProcs) -> None:
    uid_a, uid_b = str(uuid.uuid4()), str(uuid.uuid4())
    a = pods.start(f"kubepods/besteffort/pod{uid_a}/sandbox")
    a2 = pods.start(f"kubepods/besteffort/pod{uid_a}/app", share_netns_of=a.pid)
    systemd_dir = f"kubepods-burstable-pod{uid_b.replace('-', '_')}.slice"
    b = pods.start(f"kubepods.slice/kubepods-burstable.slice/{systemd_dir}/cri-x")
    loc_a = find_pod_netns(uid_a)
    assert loc_a.inode == ns_inode(a.pid) == ns_inode(a2.pid)
    assert loc_a.pid == min(a.pid, a2.pid)
    assert loc_a.cgroup_path == str(pods.base / "kubepods/besteffort" / f"pod{uid_a}")
    loc_b = find_pod_netns(uid_b)
    assert loc_b.inode == ns_inode(b.pid) != loc_a.inode
    with pytest.raises(NetnsNotFound):
        find_pod_netns(str(uuid.uuid4()))


def test_host_netns_processes_are_ignored(pods: PodProcs) -> None:
    uid = str(uuid.uuid4())
    cg = pods.base / f"kubepods/pod{uid}"
    cg.mkdir(parents=True)
    pods.dirs += [cg, cg.parent, pods.base]
    proc = subprocess.Popen(["sleep", "300"])  # a host-network pod: same netns as us
    pods.procs.append(proc)
    (cg / "cgroup.procs").write_text(str(proc.pid))
    assert uid not in scan()


def test_pin_survives_process_exit_and_verifies_inode(pods: PodProcs, pins: NetnsPins) -> None:
    uid = str(uuid.uuid4())
    proc = pods.start(f"kubepods/pod{uid}")
    loc = find_pod_netns(uid)
    path = pins.pin(uid, loc.path, loc.inode)
    assert pins.pin(uid, loc.path, loc.inode) == path  # idempotent
    proc.kill()
    proc.wait(5)
    assert pins.verify(uid, loc.inode) == path
    out = subprocess.run(
        ["nsenter", f"--net={path}", "readlink", "/proc/self/ns/net"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"net:[{loc.inode}]"
    assert pins.pinned() == {uid: loc.inode}
    pins.release(uid)
    assert pins.inode(uid) is None and not Path(path).exists()
    with pytest.raises(PinError):
        pins.verify(uid, loc.inode)


def test_recycled_pin_path_is_refused(pods: PodProcs, pins: NetnsPins) -> None:
    uid = str(uuid.uuid4())
    first = pods.start(f"kubepods/pod{uid}/a")
    first_ino = ns_inode(first.pid)
    pins.pin(uid, f"/proc/{first.pid}/ns/net", first_ino)
    pins.release(uid)
    # the same path now holds another netns (e.g. re-created by someone else)
    other = pods.start(f"kubepods/other-{secrets.token_hex(2)}")
    other_ino = ns_inode(other.pid)
    pins.pin(uid, f"/proc/{other.pid}/ns/net", other_ino)
    with pytest.raises(RecycledNetns):
        pins.verify(uid, first_ino)
    with pytest.raises(RecycledNetns):
        pins.pin(uid, f"/proc/{first.pid}/ns/net", first_ino)  # will not stack a second netns
    with pytest.raises(RecycledNetns):
        pins.pin(uid, f"/proc/{first.pid}/ns/net", other_ino)  # source is not the expected inode


def test_ip_matcher_finds_named_netns_by_pod_ips_and_refuses_ambiguity() -> None:
    from node_agent.netns.finder import IpMatcher, NetnsAmbiguous

    names = [f"hra-ipm-{secrets.token_hex(3)}" for _ in range(3)]
    octet = secrets.randbelow(200) + 20
    try:
        for i, name in enumerate(names):
            subprocess.run(["ip", "netns", "add", name], check=True)
            subprocess.run(["ip", "-n", name, "link", "add", "a0", "type", "veth", "peer", "name", "b0"], check=True)
            ip = f"10.198.{octet}.{2 if i < 2 else 3}"  # netns 0 and 1 share an IP
            subprocess.run(["ip", "-n", name, "addr", "add", f"{ip}/24", "dev", "a0"], check=True)
            subprocess.run(
                ["ip", "-n", name, "addr", "add", f"fd00:{octet:x}::{i + 10}/64", "dev", "a0", "nodad"], check=True
            )
        m = IpMatcher()
        loc = m.find("uid-c", (f"10.198.{octet}.3",))
        assert loc.path == f"/run/netns/{names[2]}"
        assert loc.inode == os.stat(f"/run/netns/{names[2]}").st_ino
        # both families must match the same netns
        loc = m.find("uid-a", (f"10.198.{octet}.2", f"fd00:{octet:x}::10"))
        assert loc.path == f"/run/netns/{names[0]}"
        with pytest.raises(NetnsAmbiguous):
            m.find("uid-x", (f"10.198.{octet}.2",))
        with pytest.raises(NetnsNotFound):
            m.find("uid-y", (f"10.198.{octet}.99",))
        gone = os.stat(f"/run/netns/{names[2]}").st_ino
        assert gone in m._cache
        subprocess.run(["ip", "netns", "del", names[2]], check=True)
        with pytest.raises(NetnsNotFound):
            m.find("uid-c", (f"10.198.{octet}.3",))
        assert gone not in m._cache  # a deleted netns' addresses are not kept for ever
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)


def test_a_netns_global_addresses_are_read_in_process_as_ip_shows_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the agent enrols a pod without IPs with: the same addresses, in the same order, as `ip addr`
    shows with scope global off lo (two links, both families, DAD pending or not), not lo's ::6, not
    link-local ones; read with no process started."""
    import ipaddress
    import json

    from node_agent.netns.finder import read_netns_ips

    def no_process(*_args: object, **_kw: object) -> None:
        raise AssertionError("a process was started")

    name = f"hra-addr-{secrets.token_hex(3)}"
    ip = ["ip", "-n", name]
    try:
        subprocess.run(["ip", "netns", "add", name], check=True)
        for args in (
            ["link", "add", "a0", "type", "veth", "peer", "name", "b0"],
            ["link", "add", "c0", "type", "veth", "peer", "name", "d0"],
            ["addr", "add", "10.197.0.2/24", "dev", "a0"],
            ["addr", "add", "fd97::2/64", "dev", "a0"],
            ["addr", "add", "fd97::3/64", "dev", "a0", "nodad"],
            ["addr", "add", "169.254.7.7/16", "dev", "a0"],
            ["addr", "add", "10.197.1.2/24", "dev", "c0"],
            ["addr", "add", "::6/128", "dev", "lo"],
            ["link", "set", "lo", "up"],
            ["link", "set", "a0", "up"],
            ["link", "set", "b0", "up"],  # a0 gets its fe80:: address
        ):
            subprocess.run([*ip, *args], check=True)
        shown = [
            a["local"]
            for link in json.loads(subprocess.run([*ip, "-j", "addr", "show"], check=True, capture_output=True).stdout)
            if link["ifname"] != "lo"
            for a in link.get("addr_info", [])
            if a.get("scope") == "global" and not ipaddress.ip_address(a["local"]).is_link_local
        ]
        assert set(shown) == {"10.197.0.2", "fd97::2", "fd97::3", "10.197.1.2"}
        with monkeypatch.context() as m:
            m.setattr(subprocess, "Popen", no_process)
            assert list(read_netns_ips(f"/run/netns/{name}")) == shown
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    with pytest.raises(OSError):
        read_netns_ips(f"/run/netns/{name}")  # gone
