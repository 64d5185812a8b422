"""eBPF backend on the real kernel: real TCP through cgroup/connect4|6 + sock_ops + getsockopt."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from node_agent.backends.base import BackendError, PodTarget

from cni.contract.spec import AmbientSpec, SidecarSpec
from tests.kernel.ebpf_fixtures import PodEnv, ebpf_backend, make_cgroup, pod_env, remove_cgroup, removed_after
from tests.kernel.parity_kit import ANY, HELPER, LOOPBACK, Scenario

pytestmark = [pytest.mark.kernel, pytest.mark.ebpf]

if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)
bcc = pytest.importorskip("bcc")

from node_agent.backends.ebpf import bpfsys, cgroup_programs, loader, pinning, tc  # noqa: E402
from node_agent.backends.ebpf.attach import Cgroup  # noqa: E402
from node_agent.backends.ebpf.backend import EbpfBackend  # noqa: E402
from node_agent.backends.ebpf.proxy_orig_dst import GRACE  # noqa: E402

SIDECAR_OUT = SidecarSpec(include_inbound_ports=())
PROXY_PROGRAMS = ["hr_getsockopt", "hr_sockops"]  # on the node proxy's cgroup (ambient)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[PodEnv]:
    yield from pod_env(tmp_path)


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[EbpfBackend]:
    yield from ebpf_backend(tmp_path / "state")


@pytest.fixture
def target(env: PodEnv, backend: EbpfBackend) -> Iterator[PodTarget]:
    yield from removed_after(env, backend)


@pytest.fixture
def make_backend(backend: EbpfBackend) -> Iterator[Callable[..., EbpfBackend]]:
    """More backends on the test backend's state dir (other settings, or a restarted agent's), each closed
    after the test (its node maps' and programs' descriptors), before the test backend."""
    made: list[EbpfBackend] = []

    def make(**settings: Any) -> EbpfBackend:
        made.append(EbpfBackend(backend.state_dir, **settings))
        return made[-1]

    yield make
    for b in made:
        b.close()


def bpftool_json(*args: str) -> list[dict[str, Any]]:

    res = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True)
    out: list[dict[str, Any]] = json.loads(res.stdout.strip() or "[]")
    return out


def wait_none_left(kind: str, ids: set[int], timeout: float = 5.0) -> bool:
    """Programs and maps are freed asynchronously (RCU): poll until none of ids is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not ids & {m["id"] for m in bpftool_json(kind, "show")}:
            return True
        time.sleep(0.1)
    return False


def wait_no_maps_of(ids: set[int], timeout: float = 5.0) -> bool:
    return wait_none_left("map", ids, timeout)


def hr_ids(kind: str) -> set[int]:
    return {x["id"] for x in bpftool_json(kind, "show") if str(x.get("name", "")).startswith("hr_")}


def cgroup_prog_names(cg: Path) -> list[str]:
    return [str(p.get("name", "")) for p in bpftool_json("cgroup", "show", str(cg))]


def proxy_programs_gone(cg: Path) -> bool:
    """The proxy cgroup's programs come off GRACE seconds after the node's last pod left: until then."""
    deadline = time.monotonic() + GRACE + 5
    while cgroup_prog_names(cg):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def start_proxy_and_server(env: PodEnv, proxy_cgroup: Path | None = None) -> None:
    env.start_server(env.pod_ns, 15001, "proxy", cgroup=proxy_cgroup or env.cgroup)
    env.start_server(env.peer_ns, 8080, "server")
    env.start_server(env.peer_ns, 9090, "server9090")


def test_sidecar_outbound_v4_reaches_proxy_with_original_destination(env, backend, target):
    start_proxy_and_server(env)
    before = env.connect(env.peer_v4, 8080)
    assert before["ok"] and before["reply"]["name"] == "server"
    backend.apply(target, SIDECAR_OUT)
    got = env.connect(env.peer_v4, 8080)
    assert got["ok"], got
    assert got["reply"]["name"] == "proxy"
    assert got["reply"]["orig"] == f"{env.peer_v4}:8080"
    # as with iptables REDIRECT, the proxy sees the pod IP as the source (not 127.0.0.1)
    assert got["reply"]["peer"] == env.pod_v4
    assert backend.check(target, SIDECAR_OUT) == []
    assert backend.installed(target)


def test_sidecar_outbound_v6(env, backend, target):
    start_proxy_and_server(env)
    backend.apply(target, SIDECAR_OUT)
    got = env.connect(env.peer_v6, 8080)
    assert got["ok"], got
    assert got["reply"]["name"] == "proxy"
    assert got["reply"]["orig"] == f"[{env.peer_v6}]:8080"
    assert ipaddress.ip_address(got["reply"]["peer"]) == ipaddress.ip_address(env.pod_v6)


def test_sidecar_outbound_v4_mapped_on_v6_socket(env, backend, target):
    start_proxy_and_server(env)
    backend.apply(target, SIDECAR_OUT)
    got = env.connect(f"::ffff:{env.peer_v4}", 8080)
    assert got["ok"], got
    assert got["reply"]["name"] == "proxy" and got["reply"]["orig"] == f"{env.peer_v4}:8080"
    assert got["reply"]["peer"] == env.pod_v4


def test_pod_with_one_family_is_captured_in_that_family_only(env, backend, target):
    """A pod given only IPv4 in PodTarget.ips: IPv6 is left alone in both directions, as the iptables backend
    installs no ip6tables rules for it; with no IPs known at all, both families are captured (from loopback)."""
    start_proxy_and_server(env)
    env.start_server(env.pod_ns, 15006, "inbound-proxy", cgroup=env.cgroup)
    env.start_server(env.pod_ns, 8080, "app", cgroup=env.cgroup)
    v4_only = dataclasses.replace(target, ips=(f"{env.pod_v4}/24",))
    backend.apply(v4_only, SidecarSpec())
    assert env.connect(env.peer_v6, 8080)["reply"]["name"] == "server"
    assert env.connect_from_peer(env.pod_v6, 8080)["reply"]["name"] == "app"
    got = env.connect(env.peer_v4, 8080)
    assert got["reply"]["name"] == "proxy" and got["reply"]["peer"] == env.pod_v4
    assert env.connect(f"::ffff:{env.peer_v4}", 8080)["reply"]["name"] == "proxy"  # IPv4 on the wire
    assert env.connect_from_peer(env.pod_v4, 8080)["reply"]["name"] == "inbound-proxy"
    unknown = dataclasses.replace(target, ips=())
    backend.apply(unknown, SidecarSpec())
    got6 = env.connect(env.peer_v6, 8080)
    assert got6["reply"]["name"] == "proxy" and got6["reply"]["orig"] == f"[{env.peer_v6}]:8080"
    assert got6["reply"]["peer"] == "::1"  # no pod IP to bind: the kernel's loopback source


@pytest.fixture
def scenario(env: PodEnv, tmp_path: Path) -> Iterator[Scenario]:
    """Processes that run as uid 1337 from before their socket exists (the proxy's uid is the creator's)."""
    helper = tmp_path / "parity_helper.py"
    helper.write_text(HELPER)
    sc = Scenario(env, helper)
    yield sc
    sc.stop()


def test_sidecar_local_destinations_as_iptables(env, backend, target, scenario):
    """App -> own pod IP: untouched; proxy (uid 1337) -> own pod IP: via inbound 15006 from the pod IP;
    from 127.0.0.6: untouched (tests/kernel/test_ebpf_source_parity.py compares all of it with iptables)."""
    env.start_server(env.pod_ns, 15001, "proxy", cgroup=env.cgroup)
    env.start_server(env.pod_ns, 15006, "inbound-proxy", cgroup=env.cgroup)
    env.start_server(env.pod_ns, 8080, "app", cgroup=env.cgroup)
    backend.apply(target, SidecarSpec())
    assert env.connect(env.pod_v4, 8080)["reply"]["name"] == "app"
    assert env.connect("127.0.0.1", 8080)["reply"]["name"] == "app"
    via = scenario.app(env.pod_v4, 8080, uid=1337)
    assert via["reply"]["name"] == "inbound-proxy" and via["reply"]["orig"] == f"{env.pod_v4}:8080"
    assert via["reply"]["peer"] == env.pod_v4 and via["reply"]["local"] == "127.0.0.1:15006"  # as iptables
    via6 = scenario.app(env.pod_v6, 8080, uid=1337)
    assert via6["reply"]["name"] == "inbound-proxy" and via6["reply"]["orig"] == f"[{env.pod_v6}]:8080"
    assert ipaddress.ip_address(via6["reply"]["peer"]) == ipaddress.ip_address(env.pod_v6)
    assert via6["reply"]["local"] == "::1:15006"  # this server prints "%s:%d"
    assert scenario.app(env.pod_v4, 8080, uid=1337, src="127.0.0.6")["reply"]["name"] == "app"
    # ::6 is put on lo (as the iptables backend does) so the sidecar can bind its IPv6 passthrough source
    assert scenario.app(env.pod_v6, 8080, uid=1337, src="::6")["reply"]["name"] == "app"
    assert scenario.app("127.0.0.1", 8080, uid=1337)["reply"]["name"] == "app"


def test_sidecar_uid_1337_bypasses(env, backend, target, scenario):
    start_proxy_and_server(env)
    backend.apply(target, SIDECAR_OUT)
    got = scenario.app(env.peer_v4, 8080, uid=1337)
    assert got["ok"] and got["reply"]["name"] == "server"
    other = scenario.app(env.peer_v4, 8080, uid=1000)
    assert other["ok"] and other["reply"]["name"] == "proxy"
    # iptables' owner match tests the socket's creator: a socket made by root stays the app's
    late = scenario.app(env.peer_v4, 8080, uid=1337, uid_after_socket=True)
    assert late["ok"] and late["reply"]["name"] == "proxy"


def test_excluded_port_and_range_bypass(env, backend, target):
    start_proxy_and_server(env)
    spec = SidecarSpec(
        include_inbound_ports=(),
        exclude_outbound_ports=(9090,),
        exclude_outbound_ranges=(ipaddress.ip_network(f"{env.peer_v6}/128"),),
    )
    backend.apply(target, spec)
    assert env.connect(env.peer_v4, 9090)["reply"]["name"] == "server9090"
    assert env.connect(env.peer_v6, 8080)["reply"]["name"] == "server"
    assert env.connect(env.peer_v4, 8080)["reply"]["name"] == "proxy"


def test_include_ranges_limit_capture(env, backend, target):
    start_proxy_and_server(env)
    spec = SidecarSpec(include_inbound_ports=(), include_outbound_ranges=(ipaddress.ip_network("192.0.2.0/24"),))
    backend.apply(target, spec)
    assert env.connect(env.peer_v4, 8080)["reply"]["name"] == "server"


def test_process_outside_pod_cgroup_untouched(env, backend, target):
    start_proxy_and_server(env)
    backend.apply(target, SIDECAR_OUT)
    got = env.connect(env.peer_v4, 8080, in_cgroup=False)
    assert got["reply"]["name"] == "server"


@pytest.fixture
def proxy_cgroup(env: PodEnv) -> Iterator[Path]:
    cg = make_cgroup(Path(f"{env.cgroup}-proxy"))
    yield cg
    remove_cgroup(cg)


def test_ambient_proxy_in_own_cgroup_gets_original_destination_and_mark_bypasses(
        env, backend, target, proxy_cgroup, make_backend):
    # the node proxy: its own cgroup, listening inside the pod netns (in-pod mode)
    start_proxy_and_server(env, proxy_cgroup=proxy_cgroup)
    amb = make_backend(inbound_fallback=_NullInbound(), proxy_cgroup=proxy_cgroup)
    amb.apply(target, AmbientSpec())
    assert amb.inbound is not None and amb.inbound.installed(target)  # inbound handed to the fallback
    got = env.connect(env.peer_v4, 8080)
    assert got["reply"]["name"] == "proxy" and got["reply"]["orig"] == f"{env.peer_v4}:8080"
    assert got["reply"]["peer"] == env.pod_v4  # the node proxy identifies the workload by its IP
    got6 = env.connect(env.peer_v6, 8080)
    assert got6["reply"]["name"] == "proxy" and got6["reply"]["orig"] == f"[{env.peer_v6}]:8080"
    assert ipaddress.ip_address(got6["reply"]["peer"]) == ipaddress.ip_address(env.pod_v6)
    marked = env.connect(env.peer_v4, 8080, mark=0x539)
    assert marked["reply"]["name"] == "server"
    assert amb.check(target, AmbientSpec()) == []
    amb.remove(target)
    assert proxy_programs_gone(proxy_cgroup)
    assert cgroup_prog_names(env.cgroup) == []


def test_ambient_all_in_ebpf_inbound_hbone_and_probe_bypass(env, backend, target, proxy_cgroup, make_backend):
    # the node proxy (own cgroup) listens in the pod netns: outbound 15001, inbound 15006, HBONE 15008
    start_proxy_and_server(env, proxy_cgroup=proxy_cgroup)
    env.start_server(env.pod_ns, 15006, "inbound-proxy", cgroup=proxy_cgroup)
    env.start_server(env.pod_ns, 15008, "hbone", cgroup=proxy_cgroup)
    env.start_server(env.pod_ns, 8080, "app", cgroup=env.cgroup)
    probe = str(AmbientSpec().probe_snat_v4)
    subprocess.run(["ip", "-n", env.peer_ns, "addr", "add", f"{probe}/32", "dev", "eth0"], check=True)
    subprocess.run(["ip", "-n", env.pod_ns, "route", "add", f"{probe}/32", "dev", "eth0"], check=True)
    amb = make_backend(proxy_cgroup=proxy_cgroup)
    amb.apply(target, AmbientSpec())
    got = env.connect_from_peer(env.pod_v4, 8080)
    assert got["reply"]["name"] == "inbound-proxy" and got["reply"]["orig"] == f"{env.pod_v4}:8080"
    assert env.connect_from_peer(env.pod_v4, 15008)["reply"]["name"] == "hbone"
    assert env.connect_from_peer(env.pod_v4, 8080, src=probe)["reply"]["name"] == "app"  # kubelet probe
    out = env.connect(env.peer_v4, 8080)
    assert out["reply"]["name"] == "proxy" and out["reply"]["orig"] == f"{env.peer_v4}:8080"
    assert amb.check(target, AmbientSpec()) == []
    amb.remove(target)
    assert env.connect_from_peer(env.pod_v4, 8080)["reply"]["name"] == "app"
    assert proxy_programs_gone(proxy_cgroup) and cgroup_prog_names(env.cgroup) == []


def test_the_only_ambient_pod_moving_cgroup_keeps_the_proxy_programs(env, backend, target, proxy_cgroup, make_backend):
    """The node's only ambient pod in a new cgroup: its programs leave the old one for the new one, and the
    proxy cgroup's programs stay through the re-apply (taking the pod's old part off must not count as the
    node's last pod leaving), so the proxy still answers SO_ORIGINAL_DST right after."""
    start_proxy_and_server(env, proxy_cgroup=proxy_cgroup)
    amb = make_backend(inbound_fallback=_NullInbound(), proxy_cgroup=proxy_cgroup)
    amb.apply(target, AmbientSpec())
    attached = sorted(cgroup_prog_names(env.cgroup))
    moved = dataclasses.replace(target, cgroup_path=str(make_cgroup(Path(f"{env.cgroup}-moved"))))
    try:
        amb.apply(moved, AmbientSpec())
        assert sorted(cgroup_prog_names(proxy_cgroup)) == PROXY_PROGRAMS
        assert cgroup_prog_names(env.cgroup) == [] and sorted(cgroup_prog_names(Path(moved.cgroup_path))) == attached
        got = env.connect(env.peer_v4, 8080, cgroup=Path(moved.cgroup_path))  # the app, in its new cgroup
        assert got["reply"]["name"] == "proxy" and got["reply"]["orig"] == f"{env.peer_v4}:8080"
    finally:
        amb.remove(moved)
        remove_cgroup(Path(f"{env.cgroup}-moved"))
    assert proxy_programs_gone(proxy_cgroup)


def test_the_proxy_programs_are_logged_as_attached_only_when_attached(env, backend, target, proxy_cgroup, caplog):
    """Each ambient apply asks for the proxy cgroup's programs (read again once max_age is over): found in
    place they are not logged as attached again; taken away, they are attached (and logged) by the next."""
    amb = EbpfBackend(backend.state_dir, inbound_fallback=_NullInbound(), proxy_cgroup=proxy_cgroup)
    amb.orig_dst.max_age = 0.0  # every apply reads them
    caplog.set_level("INFO", logger="headrace.backend.ebpf")

    def attached_logs() -> int:
        return sum(r.__dict__.get("event") == "ebpf_proxy_attached" for r in caplog.records)

    try:
        amb.apply(target, AmbientSpec())
        assert attached_logs() == 1
        amb.apply(target, AmbientSpec())
        amb.apply(target, AmbientSpec())
        assert attached_logs() == 1
        amb.orig_dst.detach(str(proxy_cgroup), amb._root())
        assert cgroup_prog_names(proxy_cgroup) == []
        amb.apply(target, AmbientSpec())
        assert attached_logs() == 2 and sorted(cgroup_prog_names(proxy_cgroup)) == PROXY_PROGRAMS
    finally:
        amb.remove(target)
        amb.close()
    assert cgroup_prog_names(proxy_cgroup) == []


def test_a_connection_accepted_before_the_last_pod_left_still_gets_its_original_destination(
        env, backend, target, proxy_cgroup):
    """The node's last eBPF pod leaves while the proxy holds a connection its programs redirected but has not
    asked for its original destination yet: the proxy cgroup's programs stay GRACE seconds more, so the
    proxy is still told the destination the app dialled (not its own address, which would drop the
    connection); then they come off."""
    import threading

    env.start_server(env.peer_ns, 8080, "server")
    delay = GRACE / 2  # asks this long after accepting: after the removal, before the grace is over
    env.start_server(env.pod_ns, 15001, f"proxy@{delay}", cgroup=proxy_cgroup)
    amb = EbpfBackend(backend.state_dir, inbound_fallback=_NullInbound(), proxy_cgroup=proxy_cgroup)
    amb.apply(target, AmbientSpec())
    got: dict[str, Any] = {}
    client = threading.Thread(target=lambda: got.update(env.connect(env.peer_v4, 8080)))
    client.start()
    time.sleep(delay / 4)  # connected and accepted
    t0 = time.monotonic()
    amb.remove(target)  # the node's last pod
    assert time.monotonic() - t0 < delay / 2, "the removal took too long for this test's timing"
    client.join(15)
    assert got["reply"]["name"].startswith("proxy") and got["reply"]["orig"] == f"{env.peer_v4}:8080"
    assert proxy_programs_gone(proxy_cgroup)
    amb.close()


def test_an_agent_killed_before_its_deferred_detach_leaves_nothing_after_the_next_start(
        env, backend, target, proxy_cgroup):
    """The agent dies within GRACE after the node's last pod left (its deferred detach never runs): the next
    agent's backend finds the proxy cgroup's programs with no pod and takes them off GRACE seconds after its
    start, as the dead one would have."""
    amb = EbpfBackend(backend.state_dir, inbound_fallback=_NullInbound(), proxy_cgroup=proxy_cgroup)
    amb.apply(target, AmbientSpec())
    amb.remove(target)  # the node's last pod: the detach is deferred
    timer = amb.orig_dst._release
    assert timer is not None
    timer.cancel()  # the agent is SIGKILLed meanwhile: its descriptors go with it, its pins stay
    amb.node_maps.close()
    amb.node_programs.close()
    time.sleep(GRACE + 0.5)
    assert sorted(cgroup_prog_names(proxy_cgroup)) == PROXY_PROGRAMS  # nobody took them off
    restarted = EbpfBackend(backend.state_dir, inbound_fallback=_NullInbound(), proxy_cgroup=proxy_cgroup)
    try:
        restarted.prepare()
        assert sorted(cgroup_prog_names(proxy_cgroup)) == PROXY_PROGRAMS  # the grace first
        assert proxy_programs_gone(proxy_cgroup)
        assert not restarted.orig_dst.pinned(restarted._root())
    finally:
        restarted.close()


def test_proxy_cgroup_learned_later(env, backend, target, proxy_cgroup, make_backend):
    start_proxy_and_server(env, proxy_cgroup=proxy_cgroup)
    amb = make_backend(inbound_fallback=_NullInbound())
    assert amb.fallback_reason(AmbientSpec()) is not None
    with pytest.raises(BackendError, match="proxy's cgroup"):  # never redirect without SO_ORIGINAL_DST
        amb.apply(target, AmbientSpec())
    assert not amb.installed(target)
    assert env.connect(env.peer_v4, 8080)["reply"]["name"] == "server"
    amb.set_proxy_cgroup(proxy_cgroup)
    assert amb.fallback_reason(AmbientSpec()) is None
    amb.apply(target, AmbientSpec())
    assert env.connect(env.peer_v4, 8080)["reply"]["orig"] == f"{env.peer_v4}:8080"
    with pytest.raises(BackendError, match="root"):
        amb.set_proxy_cgroup("/sys/fs/cgroup/unified")
    amb.remove(target)
    assert proxy_programs_gone(proxy_cgroup)


def test_restarted_backend_moves_the_proxy_program_without_an_orphan(env, backend, target, proxy_cgroup, make_backend):
    """A new backend instance (agent restart) that does not know the old proxy cgroup yet, then learns a
    new one: the node-level programs (getsockopt, sock_ops) end up on the new cgroup only, never left on the
    old."""
    amb = make_backend(inbound_fallback=_NullInbound(), proxy_cgroup=proxy_cgroup)
    amb.apply(target, AmbientSpec())
    assert sorted(cgroup_prog_names(proxy_cgroup)) == PROXY_PROGRAMS
    moved = make_cgroup(Path(f"{env.cgroup}-proxy2"))
    try:
        restarted = make_backend(inbound_fallback=_NullInbound())
        restarted.set_proxy_cgroup(moved)
        assert sorted(cgroup_prog_names(moved)) == PROXY_PROGRAMS
        assert cgroup_prog_names(proxy_cgroup) == [], "the program stayed on the old proxy cgroup"
        again = make_backend(inbound_fallback=_NullInbound(), proxy_cgroup=proxy_cgroup)
        again.apply(target, AmbientSpec())  # a restart with the old cgroup as flag: moved back, not doubled
        assert sorted(cgroup_prog_names(proxy_cgroup)) == PROXY_PROGRAMS and cgroup_prog_names(moved) == []
        again.remove(target)
        assert proxy_programs_gone(proxy_cgroup) and cgroup_prog_names(moved) == []
    finally:
        remove_cgroup(moved)


def test_ambient_dns_capture(env, backend, target, proxy_cgroup, scenario, make_backend):
    # the DNS proxy answers from the loopback address the query reached (as it must with iptables too)
    scenario.udpserve(env.pod_ns, 15053, "dnsproxy", LOOPBACK, cgroup=proxy_cgroup)
    amb = make_backend(inbound_fallback=_NullInbound(), proxy_cgroup=proxy_cgroup)
    amb.apply(target, AmbientSpec(capture_dns=True))
    got = scenario.udpapp(env.peer_v4, 53)
    assert got["unconnected"]["src"] == f"{env.peer_v4}:53" and got["unconnected"]["reply"]["data"] == "q1"
    assert got["unconnected"]["reply"]["name"] == "dnsproxy"
    assert got["unconnected"]["reply"]["peer"].startswith(f"{env.pod_v4}:")  # the pod IP, not loopback
    assert got["connected"]["peername"] == f"{env.peer_v4}:53" and got["connected"]["reply"]["data"] == "q2"
    scenario.serve(env.pod_ns, 15053, "dns-tcp", LOOPBACK, cgroup=proxy_cgroup)
    tcp = scenario.app(env.peer_v4, 53)
    assert tcp["reply"]["name"] == "dns-tcp" and tcp["reply"]["orig"] == f"{env.peer_v4}:53"
    assert tcp["peername"] == f"{env.peer_v4}:53"
    scenario.udpserve(env.pod_ns, 53, "localdns", ANY)
    local = scenario.udpapp(env.pod_v4, 53)["unconnected"]  # a pod-local destination: untouched
    assert local["reply"]["name"] == "localdns" and local["src"] == f"{env.pod_v4}:53"
    # switching DNS capture off detaches the DNS programs in place
    amb.apply(target, AmbientSpec(capture_dns=False))
    names = cgroup_prog_names(env.cgroup)
    assert "hr_sendmsg4" not in names and "hr_connect4" in names
    amb.remove(target)


def test_foreign_cgroup_program_and_tc_filter_survive(env, backend, target):
    foreign = load_foreign_connect4()
    try:
        with Cgroup(env.cgroup) as c:
            c.attach(foreign, bpfsys.ATTACH_CGROUP_INET4_CONNECT)
        tc = ["tc", "-n", env.pod_ns]
        subprocess.run([*tc, "qdisc", "add", "dev", "eth0", "clsact"], check=True)
        subprocess.run(
            [
                *tc,
                "filter",
                "add",
                "dev",
                "eth0",
                "ingress",
                "prio",
                "7",
                "u32",
                "match",
                "u32",
                "0",
                "0",
                "classid",
                "1:1",
            ],
            check=True,
        )
        start_proxy_and_server(env)
        backend.apply(target, SIDECAR_OUT)
        assert "foreign_c4" in cgroup_prog_names(env.cgroup)
        assert env.connect(env.peer_v4, 8080)["reply"]["name"] == "proxy"
        backend.remove(target)
        assert cgroup_prog_names(env.cgroup) == ["foreign_c4"]
        filters = subprocess.run(
            [*tc, "filter", "show", "dev", "eth0", "ingress"], capture_output=True, text=True, check=True
        ).stdout
        assert "pref 7 u32" in filters
        assert env.connect(env.peer_v4, 8080)["reply"]["name"] == "server"
    finally:
        with Cgroup(env.cgroup) as c:
            try:
                c.detach(foreign, bpfsys.ATTACH_CGROUP_INET4_CONNECT)
            except OSError:
                pass
        os.close(foreign)


def load_foreign_connect4() -> int:
    """Someone else's cgroup/connect4 program: 'return 1' (allow), named foreign_c4."""
    insns = bytes.fromhex("b7000000010000009500000000000000")
    return bpfsys.prog_load(bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, insns, "foreign_c4", bpfsys.ATTACH_CGROUP_INET4_CONNECT)


def test_apply_idempotent_and_readopted_after_restart(env, backend, target, tmp_path, make_backend):
    start_proxy_and_server(env)
    backend.apply(target, SIDECAR_OUT)
    names = sorted(cgroup_prog_names(env.cgroup))
    compiles = loader.compile_count
    restarted = make_backend()  # a new agent: same state dir, pins re-adopted
    assert restarted.installed(target)
    assert restarted.pinned_pods() == [target.uid]
    assert restarted.check(target, SIDECAR_OUT) == []
    restarted.apply(target, SIDECAR_OUT)
    backend.apply(target, SIDECAR_OUT)
    assert sorted(cgroup_prog_names(env.cgroup)) == names
    assert loader.compile_count == compiles == 1
    # a different spec replaces ours in place: still one of each program
    spec2 = SidecarSpec(include_inbound_ports=(), exclude_outbound_ports=(8080,))
    restarted.apply(target, spec2)
    assert sorted(cgroup_prog_names(env.cgroup)) == names
    assert env.connect(env.peer_v4, 8080)["reply"]["name"] == "server"
    assert restarted.check(target, SIDECAR_OUT) != []


def pinned_map_ids(directory: Path) -> set[int]:
    """The ids of the node maps pinned in directory."""
    ids: set[int] = set()
    for name in loader.NODE_MAPS:
        fd = pinning.open_pinned(directory / name)
        if fd is not None:
            ids.add(bpfsys.map_info(fd).map_id)
            os.close(fd)
    return ids


def pinned_node_prog_ids(directory: Path) -> set[int]:
    """The ids of the node's cgroup programs pinned under directory (node/progs-<digest>/)."""
    ids: set[int] = set()
    for path in directory.glob("progs-*/*"):
        fd = pinning.open_pinned(path)
        if fd is not None:
            ids.add(bpfsys.prog_info(fd).prog_id)
            os.close(fd)
    return ids


def node_config_keys(directory: Path, name: str = "hr_pod_cfg", size: int = 8) -> list[bytes]:
    fd = pinning.open_pinned(directory / name)
    assert fd is not None
    try:
        return bpfsys.map_keys(fd, size)
    finally:
        os.close(fd)


def our_tc_filters(env: PodEnv, hook: str) -> list[str]:
    """The lines of `tc filter show` on the pod's eth0 hook that name one of our programs."""
    out = subprocess.run(["ip", "netns", "exec", env.pod_ns, "tc", "filter", "show", "dev", "eth0", hook],
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if "hr_tc_" in line]


def node_slot_keys(directory: Path) -> list[bytes]:
    return node_config_keys(directory, "hr_pod_tc", 4)


@pytest.mark.parametrize(
    ("spec", "node_tc"), [(SIDECAR_OUT, True), (SidecarSpec(), True), (SidecarSpec(), False)],
    ids=["cgroup-only", "with-tc", "with-pod-tc"],
)
def test_remove_leaves_nothing_and_is_idempotent(env, backend, target, spec, node_tc):
    start_proxy_and_server(env)
    backend.node_tc = node_tc
    # Only what this apply created counts as ours: other processes on the machine may load hr_* too.
    before_progs, before_maps = hr_ids("prog"), hr_ids("map")
    backend.apply(target, spec)
    ours = hr_ids("prog") - before_progs
    assert ours
    node_dir = backend.state_dir / "bpf" / pinning.NODE_DIR
    node_progs = ours & pinned_node_prog_ids(node_dir)
    node_tc_progs = 2 if node_tc and spec.include_inbound_ports != () else 0  # ingress, egress
    assert len(node_progs) == len(cgroup_programs.wanted_programs(spec)) + node_tc_progs
    assert len(node_slot_keys(node_dir)) == (1 if node_tc_progs else 0)
    with_tc = spec.include_inbound_ports != ()
    assert [bool(our_tc_filters(env, hook)) for hook in ("ingress", "egress")] == [with_tc, with_tc]
    pinned_maps = {p.name for p in (backend.state_dir / "bpf" / target.uid).iterdir()} & set(loader.POD_MAPS)
    if with_tc and not node_tc:  # the pod's own TC programs read all of its maps
        assert pinned_maps == set(loader.POD_MAPS)
    else:  # an empty set is not made (inbound: every port, none listed)
        assert "hr_cfg" in pinned_maps and "hr_cfg_iin" not in pinned_maps
    ours_maps = hr_ids("map") - before_maps
    node_maps = ours_maps & pinned_map_ids(node_dir)
    assert len(node_maps) == len(loader.NODE_MAPS)
    assert len(node_config_keys(node_dir)) == 1
    backend.remove(target)
    backend.remove(target)
    assert cgroup_prog_names(env.cgroup) == []
    assert wait_none_left("prog", ours - node_progs)  # the pod's own (TC)
    assert wait_no_maps_of(ours_maps - node_maps)  # the pod's own
    assert node_config_keys(node_dir) == node_slot_keys(node_dir) == []  # its entries in the node maps too
    assert our_tc_filters(env, "ingress") == our_tc_filters(env, "egress") == []
    assert not (backend.state_dir / "bpf" / target.uid).exists()
    assert not backend.installed(target)
    assert env.connect(env.peer_v4, 8080)["reply"]["name"] == "server"
    # the node maps and programs outlive the last pod while the agent runs (the next pod would make them again)
    assert pinned_map_ids(node_dir) == node_maps
    assert pinned_node_prog_ids(node_dir) == node_progs
    backend.close()  # nothing pinned any more: the node maps, programs and the bpffs go too
    assert pinning.mount_fstype(backend.state_dir / "bpf") is None
    assert wait_none_left("prog", node_progs)
    assert wait_no_maps_of(node_maps)


def test_refuses_root_cgroup(env, backend):
    root_target = PodTarget(
        uid="x", namespace="d", name="n", netns_path=env.pod_ns_path, cgroup_path="/sys/fs/cgroup/unified"
    )
    with pytest.raises(BackendError, match="root"):
        backend.apply(root_target, SIDECAR_OUT)
    assert not backend.installed(root_target)


def test_sidecar_inbound_reaches_15006_with_original_destination(env, backend, target):
    env.start_server(env.pod_ns, 15006, "inbound-proxy", cgroup=env.cgroup)
    env.start_server(env.pod_ns, 8080, "app", cgroup=env.cgroup)
    env.start_server(env.pod_ns, 15020, "app15020", cgroup=env.cgroup)
    assert env.connect_from_peer(env.pod_v4, 8080)["reply"]["name"] == "app"
    backend.apply(target, SidecarSpec())
    got = env.connect_from_peer(env.pod_v4, 8080)
    assert got["ok"], got
    assert got["reply"]["name"] == "inbound-proxy"
    assert got["reply"]["orig"] == f"{env.pod_v4}:8080"
    assert got["reply"]["local"] == f"{env.pod_v4}:15006"  # as iptables REDIRECT: pod-ip:15006
    assert our_tc_filters(env, "egress")
    got6 = env.connect_from_peer(env.pod_v6, 8080)
    assert got6["reply"]["name"] == "inbound-proxy" and got6["reply"]["orig"] == f"[{env.pod_v6}]:8080"
    assert env.connect_from_peer(env.pod_v4, 15020)["reply"]["name"] == "app15020"  # excluded inbound port
    assert backend.check(target, SidecarSpec()) == []
    # include list: only listed ports are captured
    backend.apply(target, SidecarSpec(include_inbound_ports=(9999,)))
    assert env.connect_from_peer(env.pod_v4, 8080)["reply"]["name"] == "app"
    backend.remove(target)
    assert env.connect_from_peer(env.pod_v4, 8080)["reply"]["name"] == "app"
    assert our_tc_filters(env, "ingress") == our_tc_filters(env, "egress") == []


def test_inbound_without_proxy_listener_fails_closed(env, backend, target):
    env.start_server(env.pod_ns, 8080, "app", cgroup=env.cgroup)
    backend.apply(target, SidecarSpec())
    got = env.connect_from_peer(env.pod_v4, 8080)
    assert not got["ok"]  # never delivered around the proxy


class _NullInbound:
    """An inbound fallback that records calls (the iptables backend in production)."""

    name = "null"

    def __init__(self) -> None:
        self.applied: list[object] = []

    def apply(self, target: PodTarget, spec: object) -> None:
        self.applied.append(spec)

    def remove(self, target: PodTarget) -> None:
        self.applied.clear()

    def check(self, target: PodTarget, spec: object) -> list[str]:
        return []

    def installed(self, target: PodTarget) -> bool:
        return bool(self.applied)


class _FailingInbound(_NullInbound):
    """An inbound fallback whose apply fails while `failing` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = True

    def apply(self, target: PodTarget, spec: object) -> None:
        if self.failing:
            raise BackendError("inbound rules refused")
        super().apply(target, spec)


def test_a_failed_inbound_apply_takes_a_new_pods_ebpf_out_and_leaves_a_pods_own(env, tmp_path):
    """The inbound rules go in after the eBPF part: when they fail for a pod that had nothing of ours, its
    programs come off again (no half-applied pod); a pod that had its eBPF part keeps it (a re-apply that
    fails leaves a pod redirected, the next apply tries again)."""
    state = tmp_path / "state-inbound"
    inbound = _FailingInbound()
    b = EbpfBackend(state, inbound_fallback=inbound)
    t = env.target()
    try:
        with pytest.raises(BackendError, match="inbound rules refused"):
            b.apply(t, SidecarSpec())
        assert cgroup_prog_names(env.cgroup) == []
        assert not b.installed(t)
        inbound.failing = False
        b.apply(t, SidecarSpec())
        attached = sorted(cgroup_prog_names(env.cgroup))
        assert attached and inbound.applied
        inbound.failing = True
        with pytest.raises(BackendError, match="inbound rules refused"):
            b.apply(t, SidecarSpec(exclude_outbound_ports=(9999,)))
        assert sorted(cgroup_prog_names(env.cgroup)) == attached
        assert (state / "bpf" / t.uid / "hr_cfg").exists()
        # moved to another cgroup (its programs come off the old one): it had them, so it keeps them
        moved = dataclasses.replace(t, cgroup_path=str(make_cgroup(Path(f"{env.cgroup}-moved"))))
        with pytest.raises(BackendError, match="inbound rules refused"):
            b.apply(moved, SidecarSpec())
        assert cgroup_prog_names(env.cgroup) == [] and sorted(cgroup_prog_names(Path(moved.cgroup_path))) == attached
        t = moved
    finally:
        b.remove(t)
        b.close()
        pinning.unmount_bpffs(state)
        remove_cgroup(Path(f"{env.cgroup}-moved"))


def test_remove_after_pod_is_gone(env, backend, target):
    env.start_server(env.pod_ns, 15006, "inbound-proxy", cgroup=env.cgroup)
    backend.apply(target, SidecarSpec())
    env.close()
    subprocess.run(["ip", "netns", "del", env.pod_ns], check=True)
    remove_cgroup(env.cgroup)
    gone = PodTarget(uid=target.uid, namespace="default", name="app", netns_path=env.pod_ns_path)
    assert backend.installed(gone)  # the pins are still there
    backend.remove(gone)
    backend.remove(gone)
    assert not backend.installed(gone)
    assert not (backend.state_dir / "bpf" / target.uid).exists()


def test_failed_apply_rolls_back(env, backend):
    # a netns with only lo: the TC step fails after the cgroup programs were attached
    empty = f"hr-ebpf-empty-{env.name}"
    subprocess.run(["ip", "netns", "add", empty], check=True)
    t = PodTarget(
        uid=f"pod-{env.name}-e", namespace="d", name="e", netns_path=f"/run/netns/{empty}", cgroup_path=str(env.cgroup)
    )
    try:
        with pytest.raises(BackendError, match="no interface"):
            backend.apply(t, SidecarSpec())
        assert cgroup_prog_names(env.cgroup) == []
        assert not backend.installed(t)
        node_dir = backend.state_dir / "bpf" / pinning.NODE_DIR
        assert node_config_keys(node_dir) == []  # its parameters were in the node maps: taken out again
        for name, size in (("hr_pod_ports", 24), ("hr_pod_nets", 40)):
            fd = pinning.open_pinned(node_dir / name)
            assert fd is not None
            assert bpfsys.map_keys(fd, size) == [], name
            os.close(fd)
    finally:
        backend.remove(t)
        subprocess.run(["ip", "netns", "del", empty], check=False)


def test_probe_and_auto_selection_pick_ebpf_here(tmp_path):
    from node_agent.backends.ebpf.probe import probe
    from node_agent.backends.select import select_backend

    assert probe() == []
    choice = select_backend("auto", state_dir=tmp_path / "s", iptables_flavour="auto")
    assert choice.backend.name == "ebpf"
    assert "eBPF available" in choice.reason


def test_drift_detected_and_repaired(env, backend, target):
    env.start_server(env.pod_ns, 15006, "inbound-proxy", cgroup=env.cgroup)
    env.start_server(env.pod_ns, 8080, "app", cgroup=env.cgroup)
    backend.apply(target, SidecarSpec())
    names = sorted(cgroup_prog_names(env.cgroup))
    # someone deletes our TC filter and detaches our connect4
    subprocess.run(["ip", "netns", "exec", env.pod_ns, "tc", "filter", "del", "dev", "eth0", "ingress", "pref",
                    str(tc.HR_PRIO), "handle", "1", "bpf"], check=True)
    fd = pinning.open_pinned(backend.state_dir / "bpf" / target.uid / "hr_connect4")
    assert fd is not None
    with Cgroup(env.cgroup) as c:
        c.detach(fd, bpfsys.ATTACH_CGROUP_INET4_CONNECT)
    os.close(fd)
    problems = backend.check(target, SidecarSpec())
    assert any("eth0" in p for p in problems) and any("hr_connect4" in p for p in problems)
    assert env.connect_from_peer(env.pod_v4, 8080)["reply"]["name"] == "app"
    backend.apply(target, SidecarSpec())
    assert backend.check(target, SidecarSpec()) == []
    assert sorted(cgroup_prog_names(env.cgroup)) == names
    assert env.connect_from_peer(env.pod_v4, 8080)["reply"]["name"] == "inbound-proxy"


def test_unpinned_leftover_is_not_duplicated(env, backend, target):
    """A crash between attach and pin leaves an attached, unpinned program: the next apply replaces it."""
    backend.apply(target, SIDECAR_OUT)
    pinning.unpin(backend.state_dir / "bpf" / target.uid / "hr_connect4")
    assert backend.check(target, SIDECAR_OUT) != []
    backend.apply(target, SIDECAR_OUT)
    assert cgroup_prog_names(env.cgroup).count("hr_connect4") == 1
    assert backend.check(target, SIDECAR_OUT) == []
    # the pod's whole pin directory lost (a new one is made) and the node's programs loaded again (as after
    # an upgrade): every program attached to the pod is replaced by the new one, once
    names = sorted(cgroup_prog_names(env.cgroup))
    bpf = backend.state_dir / "bpf"
    pinning.remove_dir(bpf / target.uid)
    for progs in (bpf / pinning.NODE_DIR).glob("progs-*"):
        pinning.remove_dir(progs)
    backend.apply(target, SIDECAR_OUT)
    assert sorted(cgroup_prog_names(env.cgroup)) == names
    assert backend.check(target, SIDECAR_OUT) == []
    backend.remove(target)
    assert cgroup_prog_names(env.cgroup) == []


def test_tproxy_interception_mode_is_declined(env, backend, target):
    """Sidecar TPROXY mode needs iptables' policy routing for the proxy's original-source connections: the
    eBPF backend names that and refuses, so the agent puts such pods on iptables (never half-redirected)."""
    if "interception_mode" not in {f.name for f in dataclasses.fields(SidecarSpec)}:
        pytest.skip("SidecarSpec has no interception_mode here")
    tproxy = SidecarSpec(interception_mode="TPROXY")  # type: ignore[call-arg,unused-ignore]
    assert "TPROXY" in (backend.fallback_reason(tproxy) or "")
    with pytest.raises(BackendError, match="TPROXY"):
        backend.apply(target, tproxy)
    assert not backend.installed(target)
    # TPROXY without inbound capture is REDIRECT mode's outbound only: eBPF does it
    assert backend.fallback_reason(dataclasses.replace(tproxy, include_inbound_ports=())) is None


def test_inbound_connection_made_before_capture_keeps_working(env, backend, target):
    """As with iptables (REDIRECT applies to new connections only), a connection to the app that exists when
    inbound capture starts stays with the app: TC rewrites only flows whose SYN it saw."""
    import socket
    import threading

    from cni.kernel.netns import entered

    with entered(env.pod_ns_path):
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with entered(f"/run/netns/{env.peer_ns}"):
        cli = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 8080))
    srv.listen(4)
    cli.settimeout(3)

    def echo() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(100):
                conn.sendall(b"app|" + data)

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    try:
        cli.connect((env.pod_v4, 8080))
        cli.sendall(b"before")
        assert cli.recv(100) == b"app|before"
        env.start_server(env.pod_ns, 15006, "inbound-proxy", cgroup=env.cgroup)
        backend.apply(target, SidecarSpec())
        cli.sendall(b"after")
        assert cli.recv(100) == b"app|after"  # not rewritten to 15006, replies not rewritten either
        assert env.connect_from_peer(env.pod_v4, 8080)["reply"]["name"] == "inbound-proxy"  # new ones are
    finally:
        cli.close()
        srv.close()
        t.join(timeout=3)


def _netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


@pytest.mark.parametrize("rules", ["nftables", "iptables"])
def test_apply_after_runs_first_inside_the_rules_backends_netns_entry(
        env, backend, target, proxy_cgroup, rules, make_backend):
    """The agent's conntrack guard (`first`) runs inside the pod netns, on the thread and in the netns entry
    the ambient inbound rules go in with, before them."""
    from node_agent.backends.iptables.backend import IptablesBackend
    from node_agent.backends.nftables.backend import NftablesBackend

    inbound = NftablesBackend() if rules == "nftables" else IptablesBackend("auto")
    amb = make_backend(proxy_cgroup=proxy_cgroup, ambient_inbound=inbound)
    seen: list[tuple[int, bool]] = []
    amb.apply_after(target, AmbientSpec(), lambda: seen.append((_netns_inode(), inbound.installed(target))))
    try:
        assert seen == [(os.stat(target.netns_path).st_ino, False)]
        assert amb.check(target, AmbientSpec()) == []
    finally:
        amb.remove(target)


@pytest.mark.parametrize("rules", ["nftables", "iptables"])
def test_an_ambient_pods_two_parts_are_read_apart(env, backend, target, proxy_cgroup, rules, make_backend):
    """An eBPF ambient pod's inbound rules and policy routing (on a rules backend whose changes are announced)
    are what `check_announced` reads; its programs are what `check_unannounced` reads; `check` reads both."""
    from node_agent.backends.iptables.backend import IptablesBackend
    from node_agent.backends.nftables.backend import NftablesBackend

    inbound = NftablesBackend() if rules == "nftables" else IptablesBackend("auto")
    amb = make_backend(proxy_cgroup=proxy_cgroup, ambient_inbound=inbound)
    spec = AmbientSpec()
    amb.apply(target, spec)
    try:
        assert amb.announces_part(spec) == (rules == "nftables" or inbound.change_events)
        assert amb.check_announced(target, spec) == amb.check_unannounced(target, spec) == []
        inbound.remove(target)  # the inbound rules gone
        assert amb.check_announced(target, spec) != [] and amb.check_unannounced(target, spec) == []
        amb.apply(target, spec)
        assert amb.check(target, spec) == []
        with Cgroup(env.cgroup) as c:  # a program gone
            cgroup_programs.detach_pinned(c, backend.state_dir / "bpf" / target.uid / "hr_connect4")
        assert amb.check_announced(target, spec) == [] and amb.check_unannounced(target, spec) != []
        assert amb.check(target, spec) == amb.check_unannounced(target, spec)
    finally:
        amb.remove(target)


def test_apply_after_runs_first_in_the_pod_netns_without_a_rules_backend(env, backend, target):
    """A sidecar pod with its inbound in TC: no rules backend enters the netns, so `first` runs there on a
    pooled thread, before anything is applied."""
    seen: list[tuple[int, list[str]]] = []
    backend.apply_after(target, SidecarSpec(), lambda: seen.append((_netns_inode(), cgroup_prog_names(env.cgroup))))
    assert seen == [(os.stat(target.netns_path).st_ino, [])]
    assert backend.check(target, SidecarSpec()) == []
