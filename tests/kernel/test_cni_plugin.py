"""headrace-cni on the real kernel: bridge + host-local + headrace-cni run by the harness's CNI runner
inside a simulated node netns; pods are netns. Parametrized over iptables-legacy and iptables-nft via the
conflist's `iptables` field. One real-traffic check here; the iptables helper's tests cover the matrix.
"""

from __future__ import annotations

import json
import shlex
import shutil
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.harness.cni_runner import CniInvocationError, CniRunner
from tests.harness.node import Pod, SimNode
from tests.harness.traffic import Listener, tcp_request

pytestmark = pytest.mark.kernel

SIDECAR = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}
FLAVOURS = ["legacy", "nft"]


def save(pod: Pod, flavour: str) -> str:
    """Both families' full rule dumps of the pod netns in one flavour (counters stripped)."""
    out: list[str] = []
    for tool in (f"iptables-{flavour}-save", f"ip6tables-{flavour}-save"):
        text = pod.netns.run([tool]).stdout
        # chain headers carry packet counters (":OUTPUT ACCEPT [1:40]"): traffic on the node's bridge
        # (e.g. an IGMP report) would change them between two saves
        out.extend(
            line.split(" [")[0] if line.startswith(":") else line
            for line in text.splitlines()
            if not line.startswith("#")
        )
    return "\n".join(out)


def headrace_lines(pod: Pod) -> list[str]:
    return [line for fl in FLAVOURS for line in save(pod, fl).splitlines() if "HEADRACE" in line]


def headrace(node: SimNode, version: str = "1.0.0") -> dict[str, Any]:
    return node.runner(version).plugin_conf("headrace-cni")


def run_headrace(node: SimNode, pod: Pod, command: str, *, version: str = "1.0.0", **kw: Any) -> Any:
    runner = node.runner(version)
    plugin = runner.plugin_conf("headrace-cni")
    kw.setdefault("netns", pod.netns.path)
    kw.setdefault("prev", pod.result)
    return runner.exec_plugin(plugin, command, container_id=pod.container_id, args=pod.cni_args, **kw)


@pytest.fixture(params=FLAVOURS)
def flavour_node(request: pytest.FixtureRequest, make_node: Callable[..., SimNode]) -> tuple[str, SimNode]:
    flavour = str(request.param)
    return flavour, make_node(headrace={"iptables": flavour})


def test_sidecar_outbound_is_redirected_with_original_dst(flavour_node: tuple[str, SimNode]) -> None:
    flavour, node = flavour_node
    backend = node.add_pod("shop", "backend")
    web = node.add_pod("shop", "web", annotations=SIDECAR)
    other = "legacy" if flavour == "nft" else "nft"
    assert "HEADRACE_SC_OUTPUT" in save(web, flavour)
    assert "HEADRACE" not in save(web, other)  # the configured flavour only
    for family, dst in ((4, backend.ipv4), (6, backend.ipv6)):
        with (
            Listener(web.netns.path, 15001, family=family, label="proxy") as proxy,
            Listener(backend.netns.path, 8080, family=family, label="backend") as real,
        ):
            reply = tcp_request(web.netns.path, dst, 8080, b"hello")
            assert reply == b"proxy|hello"
            conn = proxy.wait_one()
            assert conn.original_dst == (dst, 8080)
            assert real.count() == 0
            # the non-mesh backend reaching the same port is not captured anywhere
            assert tcp_request(backend.netns.path, dst, 8080, b"x") == b"backend|x"


def test_non_mesh_pod_is_untouched(flavour_node: tuple[str, SimNode]) -> None:
    _flavour, node = flavour_node
    node.add_namespace("plain")
    backend = node.add_pod("plain", "backend")
    client = node.add_pod("plain", "client")
    excluded = node.add_pod("kube-system", "dns", annotations=SIDECAR)
    for pod in (client, backend, excluded):
        assert headrace_lines(pod) == []
    with Listener(backend.netns.path, 8080, label="backend"):
        assert tcp_request(client.netns.path, backend.ipv4, 8080, b"hi") == b"backend|hi"


def test_add_twice_one_set_check_del(flavour_node: tuple[str, SimNode]) -> None:
    flavour, node = flavour_node
    web = node.add_pod("shop", "web", annotations=SIDECAR)
    first = save(web, flavour)
    assert run_headrace(node, web, "ADD") == web.result  # prevResult passed through unchanged
    assert save(web, flavour) == first  # ADD again: the same single set of rules
    assert run_headrace(node, web, "CHECK") is None
    node.runner().check(web.container_id, web.netns.path, args=web.cni_args)  # the whole chain

    node.runner().delete(web.container_id, web.netns.path, args=web.cni_args)
    assert headrace_lines(web) == []
    # DEL again (rules and interface already gone) still succeeds
    assert run_headrace(node, web, "DEL") is None


def test_check_fails_when_a_chain_is_deleted_or_altered(flavour_node: tuple[str, SimNode]) -> None:
    flavour, node = flavour_node
    web = node.add_pod("shop", "web", annotations=SIDECAR)
    ipt = f"iptables-{flavour}"
    # someone inserts a rule into one of our chains: altered
    web.netns.run([ipt, "-t", "nat", "-I", "HEADRACE_SC_OUTPUT", "1", "-p", "tcp", "--dport", "1", "-j", "RETURN"])
    with pytest.raises(CniInvocationError) as info:
        run_headrace(node, web, "CHECK")
    assert info.value.code == 105 and "HEADRACE_SC_OUTPUT" in json.dumps(info.value.error)
    run_headrace(node, web, "ADD")  # repair
    assert run_headrace(node, web, "CHECK") is None
    # someone deletes the chain (its jumps first, then the chain)
    for line in web.netns.run([ipt + "-save", "-t", "nat"]).stdout.splitlines():
        if line.startswith("-A ") and line.endswith("-j HEADRACE_SC_OUTPUT"):
            web.netns.run([ipt, "-t", "nat", "-D", *shlex.split(line)[1:]])
    web.netns.run([ipt, "-t", "nat", "-F", "HEADRACE_SC_OUTPUT"])
    web.netns.run([ipt, "-t", "nat", "-X", "HEADRACE_SC_OUTPUT"])
    with pytest.raises(CniInvocationError) as info:
        node.runner().check(web.container_id, web.netns.path, args=web.cni_args)
    assert info.value.plugin == "headrace-cni" and info.value.code == 105
    assert "missing or altered" in info.value.msg


def test_del_with_empty_netns_and_gone_netns(flavour_node: tuple[str, SimNode]) -> None:
    _, node = flavour_node
    web = node.add_pod("shop", "web", annotations=SIDECAR)
    assert run_headrace(node, web, "DEL", netns="") is None  # containerd after the netns is gone
    assert run_headrace(node, web, "DEL", netns="/run/netns/hrpod-does-not-exist") is None


@pytest.mark.parametrize("backend", ["iptables", "nftables", "auto"])
def test_del_succeeds_on_a_host_without_the_tools_its_add_failed_on(
        make_node: Callable[..., SimNode], tmp_path: Path, backend: str) -> None:
    node = make_node(headrace={"backend": backend})
    web = node.add_pod("shop", "plain")
    web.annotations = dict(SIDECAR)
    node.write_pod(web)
    only_nsenter = tmp_path / "bin"
    only_nsenter.mkdir()
    (only_nsenter / "nsenter").symlink_to(shutil.which("nsenter") or "/usr/bin/nsenter")
    for path in (str(only_nsenter), str(tmp_path / "empty")):
        with pytest.raises(CniInvocationError) as info:
            run_headrace(node, web, "ADD", env_override={"PATH": path})
        assert info.value.code == 102
        assert run_headrace(node, web, "DEL", env_override={"PATH": path}) is None  # the runtime can let go
    assert headrace_lines(web) == []
    logged = [json.loads(line) for line in node.log_file.read_text().splitlines()]
    dels = [entry["msg"] for entry in logged if entry.get("cmd") == "DEL" and entry["step"] == "redirect"]
    assert dels and all("a tool is missing" in msg for msg in dels), dels


def test_bad_input_leaves_the_netns_untouched(flavour_node: tuple[str, SimNode]) -> None:
    _flavour, node = flavour_node
    pod = node.add_pod("shop", "plain")
    before = {fl: save(pod, fl) for fl in FLAVOURS}
    # the pod object turns into a sidecar pod with a hostile annotation
    pod.annotations = {**SIDECAR, "traffic.sidecar.istio.io/excludeOutboundPorts": "22\n-A OUTPUT -j DROP"}
    node.write_pod(pod)
    with pytest.raises(CniInvocationError) as info:
        run_headrace(node, pod, "ADD")
    assert info.value.code == 101 and "excludeOutboundPorts" in info.value.msg
    pod.annotations = dict(SIDECAR)
    node.write_pod(pod)
    cases: list[tuple[dict[str, Any], int]] = [
        ({"stdin_override": b'{"cniVersion": "1.0.0", "name": '}, 6),
        ({"stdin_override": json.dumps({**headrace(node), "name": "n", "cniVersion": "0.2.0"}).encode()}, 1),
        ({"prev": None}, 7),
        ({"env_override": {"CNI_IFNAME": "bad/if"}}, 4),
        ({"netns": "/run/netns/hrpod-missing"}, 106),
    ]
    for kwargs, code in cases:
        with pytest.raises(CniInvocationError) as info:
            run_headrace(node, pod, "ADD", **kwargs)
        assert info.value.code == code, info.value
    assert {fl: save(pod, fl) for fl in FLAVOURS} == before


def test_status_gc_version(make_node: Callable[..., SimNode]) -> None:
    node = make_node(headrace={})
    runner = node.runner("1.1.0")
    plugin = runner.plugin_conf("headrace-cni")
    version = runner.exec_plugin(plugin, "VERSION", stdin_override=b'{"cniVersion": "1.1.0"}')
    assert version == {"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}
    assert runner.exec_plugin(plugin, "STATUS") is None
    gc = dict(plugin, **{"cni.dev/valid-attachments": [{"containerID": "abc", "ifname": "eth0"}]})
    assert runner.exec_plugin(gc, "GC") is None
    with pytest.raises(CniInvocationError) as info:
        node.runner("1.0.0").exec_plugin(plugin, "STATUS")
    assert info.value.code == 1


# Debian's bridge plugin speaks up to 1.0.0; for 1.1.0 it runs behind a version shim (a primary plugin
# that answers in 1.1.0 what bridge answers in 1.0.0; the two versions' results have the same shape).
BRIDGE_V11 = """#!/usr/bin/python3
import json, subprocess, sys
data = sys.stdin.buffer.read()
conf = json.loads(data) if data.strip() else {}
if conf.get("cniVersion") == "1.1.0":
    conf["cniVersion"] = "1.0.0"
    if isinstance(conf.get("prevResult"), dict):
        conf["prevResult"]["cniVersion"] = "1.0.0"
out = subprocess.run(["/usr/lib/cni/bridge"], input=json.dumps(conf).encode(), capture_output=True)
text = out.stdout
if text.strip():
    obj = json.loads(text)
    if obj.get("cniVersion") == "1.0.0":
        obj["cniVersion"] = "1.1.0"
    if "supportedVersions" in obj:
        obj["supportedVersions"].append("1.1.0")
    text = json.dumps(obj).encode()
sys.stdout.buffer.write(text)
sys.stderr.buffer.write(out.stderr)
sys.exit(out.returncode)
"""


def v11_runner(node: SimNode, tmp_path: Path) -> CniRunner:
    """The node's chain at cniVersion 1.1.0, with bridge behind the version shim."""
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    shim = shim_dir / "bridge-v11"
    shim.write_text(BRIDGE_V11)
    shim.chmod(0o755)
    conf = node.conflist("1.1.0")
    conf["plugins"][0]["type"] = "bridge-v11"
    base = node.runner("1.1.0")
    return CniRunner(conf, [str(shim_dir), *base.cni_path], base.cache_dir, run_netns=base.run_netns)


def test_chain_at_1_1_0_redirects_and_checks(make_node: Callable[..., SimNode], tmp_path: Path) -> None:
    """A 1.1.0 chain on the real kernel: headrace-cni gets a 1.1.0 prevResult, returns it unchanged,
    the sidecar redirect works (real traffic), CHECK passes and fails when a chain is gone, DEL cleans."""
    from tests.harness.netns import NetNS

    node = make_node(headrace={"iptables": "nft"})
    runner = v11_runner(node, tmp_path)
    node.add_namespace("shop")
    netns, peer = NetNS.create("hrpod-"), node.add_pod("default", "peer")
    pod = Pod("shop", "web", "7f0c6a8e-0000-4000-8000-000000000011", netns, "d" * 32, {}, {}, dict(SIDECAR))
    node.write_pod(pod)
    try:
        result = runner.add(pod.container_id, netns.path, args=pod.cni_args)
        bridge_out, headrace_out = runner.timings[0].result, runner.timings[1].result
        assert headrace_out == bridge_out == result and result["cniVersion"] == "1.1.0"
        with Listener(netns.path, 15001, label="out") as out, Listener(peer.netns.path, 8080, label="peer"):
            assert tcp_request(netns.path, peer.ipv4, 8080, b"x") == b"out|x"
            assert out.wait_one().original_dst == (peer.ipv4, 8080)
        runner.check(pod.container_id, netns.path, args=pod.cni_args)
        netns.run(["iptables-nft", "-t", "nat", "-F", "HEADRACE_SC_OUTPUT"])
        with pytest.raises(CniInvocationError) as info:
            runner.check(pod.container_id, netns.path, args=pod.cni_args)
        assert info.value.code == 105
        runner.delete(pod.container_id, netns.path, args=pod.cni_args)
        assert headrace_lines(pod) == []
    finally:
        netns.delete()


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_chain_result_is_the_bridge_result(make_node: Callable[..., SimNode], version: str) -> None:
    """With the real bridge + host-local, headrace-cni's output is exactly what bridge returned."""
    from tests.harness.netns import NetNS

    node = make_node(headrace={})
    runner = node.runner(version)
    netns = NetNS.create("hrpod-")
    pod = Pod("shop", "web", "7f0c6a8e-0000-4000-8000-000000000001", netns, "c" * 32, {}, {}, dict(SIDECAR))
    node.add_namespace("shop")
    node.write_pod(pod)
    try:
        result = runner.add(pod.container_id, netns.path, args=pod.cni_args)
        bridge_out, headrace_out = runner.timings[0].result, runner.timings[1].result
        assert runner.timings[1].plugin == "headrace-cni"
        assert headrace_out == bridge_out == result and result["cniVersion"] == version
        assert {ip["address"].split("/")[0] for ip in result["ips"]} and "HEADRACE_SC_OUTPUT" in "".join(
            headrace_lines(pod)
        )
        runner.check(pod.container_id, netns.path, args=pod.cni_args)
        runner.delete(pod.container_id, netns.path, args=pod.cni_args)
        assert headrace_lines(pod) == []
    finally:
        netns.delete()


def test_ambient_pod_fails_closed_without_agent(make_node: Callable[..., SimNode]) -> None:
    node = make_node(headrace={"agent_timeout": 2})
    node.add_namespace("mesh", labels={"istio.io/dataplane-mode": "ambient"})
    with pytest.raises(CniInvocationError) as info:
        node.add_pod("mesh", "app")
    assert info.value.plugin == "headrace-cni" and info.value.code == 103
    assert node.add_pod("mesh", "optout", labels={"istio.io/dataplane-mode": "none"}).result["ips"]


class _ObjectsApi(BaseHTTPRequestHandler):
    """Serves the node's objects dir as the Kubernetes API would (bearer token required)."""

    objects_dir: Path
    token = "t0ken"
    seen: list[str]

    def do_GET(self) -> None:
        self.seen.append(self.path)
        parts = self.path.strip("/").split("/")
        name = None
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) == 4:
            name = f"namespace-{parts[3]}.json"
        elif parts[:3] == ["api", "v1", "namespaces"] and len(parts) == 6 and parts[4] == "pods":
            name = f"pod-{parts[3]}-{parts[5]}.json"
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            code, body = 401, b'{"kind":"Status","code":401}'
        elif name and (self.objects_dir / name).exists():
            code, body = 200, (self.objects_dir / name).read_bytes()
        else:
            code, body = 404, b'{"kind":"Status","code":404,"reason":"NotFound"}'
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_sidecar_pod_from_the_kubernetes_api_over_tls(make_node: Callable[..., SimNode], tmp_path: Path) -> None:
    """The pod source is an HTTPS API server inside the node netns (the plugin runs there too)."""
    from cni.kernel.netns import entered
    from tests.unit.test_cni_podsource import openssl_cert

    cert, key = openssl_cert(tmp_path, "apiserver")
    node = make_node(headrace={})

    class Handler(_ObjectsApi):
        objects_dir = node.objects_dir
        seen: list[str] = []

    with entered(node.netns.path):
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            json.dumps(
                {
                    "current-context": "c",
                    "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                    "clusters": [
                        {
                            "name": "k",
                            "cluster": {
                                "server": f"https://127.0.0.1:{server.server_address[1]}",
                                "certificate-authority": str(cert),
                            },
                        }
                    ],
                    "users": [{"name": "u", "user": {"token": _ObjectsApi.token}}],
                }
            )
        )
        node.headrace = {"kubeconfig": str(kubeconfig), "objects_dir": None}
        assert node.runner().plugin_conf("headrace-cni")["objects_dir"] is None  # only the API
        web = node.add_pod("shop", "web", annotations=SIDECAR)
        plain = node.add_pod("shop", "plain")
        assert any(p.endswith("/pods/web") for p in Handler.seen)
        assert "/api/v1/namespaces/shop" in Handler.seen  # asked for the plain pod's namespace labels
        assert "HEADRACE_SC_OUTPUT" in "".join(headrace_lines(web)) and headrace_lines(plain) == []
        with Listener(web.netns.path, 15001, label="proxy") as proxy:
            assert tcp_request(web.netns.path, plain.ipv4, 8080, b"k8s") == b"proxy|k8s"
            assert proxy.wait_one().original_dst == (plain.ipv4, 8080)
        # a pod the API does not know: ADD fails (the API is authoritative)
        with pytest.raises(CniInvocationError) as info:
            run_headrace(node, plain, "ADD", env_override={"CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=ghost"})
        assert info.value.code == 100
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
