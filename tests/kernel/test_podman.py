"""A real runtime: podman 4.3 (CNI backend, runc) starts containers on a network whose conflist chains
bridge + host-local + headrace-cni, and the sidecar redirect is observed from inside a container.

Podman runs fully isolated (its own containers.conf, storage, state, locks, network configs under the
test's tmp dir; see tests/podman_support and docs/podman.md) and inside a simulated node's netns, so the
bridge and veths are made there and the machine's root netns gets nothing. The container root filesystem
is built from this machine's binaries (no registry): bash's /dev/tcp is the client.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness.netns import NetNS, run_in, unique
from tests.harness.node import SimNode
from tests.harness.traffic import Listener, tcp_request
from tests.podman_support.isolated import IsolatedPodman, cgroup_hierarchies
from tests.podman_support.pods import (
    PODMAN_DEFAULT_NAMESPACE,
    SIDECAR_STATUS,
    SIDECAR_STATUS_VALUE,
    pod_object,
    write_pod_object,
)
from tests.podman_support.rootfs import bash_tcp_client, build_rootfs

pytestmark = [pytest.mark.kernel, pytest.mark.podman]

REQUIRE_ENV = "HEADRACE_REQUIRE_PODMAN"  # set to 1 (CI): podman that cannot run is a failure, not a skip


def root_links() -> set[str]:
    """Link names in the machine's root netns (read only)."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def _skip_or_fail(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def podman_works(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Try podman once: an isolated podman in a throwaway netns runs a container with no network."""
    for binary in ("podman", "runc", "nsenter", "conmon"):
        if shutil.which(binary) is None and not os.path.exists(f"/usr/libexec/podman/{binary}"):
            _skip_or_fail(f"podman cannot run here: {binary} is not installed")
    base = tmp_path_factory.mktemp("podman-probe")
    ns = NetNS.create("hrpmp-")
    pm = IsolatedPodman.create(base / "podman", node_netns=ns.path)
    try:
        rootfs = build_rootfs(base / "rootfs")
        proc = pm.probe(unique("hr-probe-", 8), rootfs)
        if proc.returncode != 0:
            _skip_or_fail(f"podman cannot run a container here: {proc.stderr.strip()[-400:]}")
    finally:
        pm.close()
        ns.delete()
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class PodmanNode:
    node: SimNode
    podman: IsolatedPodman
    network: str
    base: Path
    flavour: str
    _n: int = 0

    def start(
        self,
        name: str,
        *,
        namespace: str = PODMAN_DEFAULT_NAMESPACE,
        annotations: dict[str, str] | None = None,
    ) -> str:
        """Write the Pod object podman's CNI_ARGS point at (<namespace>/<container name>), then start a
        container from a freshly built rootfs."""
        write_pod_object(
            self.node.objects_dir,
            pod_object(namespace, name, annotations=annotations, node_name=self.node.netns.name),
        )
        self._n += 1
        rootfs = build_rootfs(self.base / f"rootfs{self._n}")
        self.podman.run_container(name, rootfs, network=self.network, command=["/bin/sleep", "600"])
        return name

    def ip(self, name: str, version: int = 4) -> str:
        net = self.podman.inspect(name)["NetworkSettings"]["Networks"][self.network]
        return str(net["IPAddress"] if version == 4 else net["GlobalIPv6Address"])

    def tcp(self, name: str, host: str, port: int, payload: str, user: str | None = None) -> str:
        """Connect from inside the container (root unless user="UID:GID"); returns what it printed."""
        proc = self.podman.exec(name, bash_tcp_client(host, port, payload), user=user)
        assert proc.returncode == 0, f"client in {name} failed ({proc.returncode}): {proc.stderr.strip()}"
        return proc.stdout

    def nat_rules(self, name: str) -> str:
        save = "iptables-legacy-save" if self.flavour == "legacy" else "iptables-nft-save"
        return run_in(self.podman.netns_path(name), [save, "-t", "nat"]).stdout

    def plugin_log(self) -> list[dict[str, Any]]:
        path = self.node.log_file
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(params=["legacy", "nft"])
def podman_node(
    request: pytest.FixtureRequest, podman_works: None, make_node: Callable[..., SimNode], tmp_path: Path
) -> Iterator[PodmanNode]:
    flavour = str(request.param)
    # node netns, objects dir, bin dir holding the headrace-cni symlink (SimNode makes it)
    node = make_node(headrace={"log_level": "debug", "iptables": flavour})
    node.add_namespace(PODMAN_DEFAULT_NAMESPACE)
    base = tmp_path / "pm"
    pm = IsolatedPodman.create(base / "podman", node_netns=node.netns.path, extra_plugin_dirs=[str(node.root / "bin")])
    try:
        network = pm.write_network(node.conflist())
        yield PodmanNode(node, pm, network, base, flavour)
    finally:
        pm.close()  # make_node's teardown then removes the node netns (and the bridge in it)
        shutil.rmtree(base, ignore_errors=True)


def test_podman_container_is_redirected_by_headrace_cni(podman_node: PodmanNode) -> None:
    before = root_links()
    pn = podman_node
    node = pn.node
    # A real destination on the same bridge: a pod made by the harness (no annotation, nothing captured).
    peer = node.add_pod("default", unique("peer-", 8))

    mesh = pn.start(unique("hr-mesh-", 8), annotations={SIDECAR_STATUS: SIDECAR_STATUS_VALUE})
    plain = pn.start(unique("hr-plain-", 8))

    # Podman ran the chain inside the node netns: the bridge and all three veths are there, none in root.
    node_links = node.netns.run(["ip", "-o", "link", "show"]).stdout
    assert f" {node.bridge}:" in node_links
    assert sum(1 for line in node_links.splitlines() if f"master {node.bridge}" in line) == 3
    assert root_links() - before == set(), "podman created links in the machine's root netns"
    hosts = {str(a) for a in node.subnet_v4.hosts()}
    assert pn.ip(mesh) in hosts and pn.ip(plain) in hosts

    # headrace-cni ran for both (podman's CNI_ARGS: K8S_POD_NAME=<container>, namespace assumed default).
    assert "HEADRACE" in pn.nat_rules(mesh)
    assert "HEADRACE" not in pn.nat_rules(plain)

    mesh_ns = pn.podman.netns_path(mesh)
    plain_ns = pn.podman.netns_path(plain)
    with (
        Listener(peer.netns.path, 8080, label="peer") as peer4,
        Listener(peer.netns.path, 8080, family=6, label="peer6") as peer6,
        Listener(mesh_ns, 15001, label="mesh-outbound") as mesh_out4,
        Listener(mesh_ns, 15001, family=6, label="mesh-outbound6") as mesh_out6,
        Listener(mesh_ns, 15006, label="mesh-inbound") as mesh_in4,
        Listener(plain_ns, 15001, label="plain-outbound") as plain_out4,
    ):
        # Sidecar pod: the app's connection to the peer lands on 15001 with the original destination.
        assert pn.tcp(mesh, peer.ipv4, 8080, "hello") == "mesh-outbound|hello"
        assert mesh_out4.wait_one().original_dst == (peer.ipv4, 8080)
        assert pn.tcp(mesh, peer.ipv6, 8080, "hello6") == "mesh-outbound6|hello6"
        assert mesh_out6.wait_one().original_dst == (peer.ipv6, 8080)
        assert peer4.count() == 0 and peer6.count() == 0

        # The proxy's uid 1337 goes straight out.
        assert pn.tcp(mesh, peer.ipv4, 8080, "proxy", user="1337:1337") == "peer|proxy"
        assert peer4.wait_one().peer[0] == pn.ip(mesh)
        assert mesh_out4.count() == 0

        # Inbound: the peer connecting to the mesh pod's app port lands on 15006.
        assert tcp_request(peer.netns.path, pn.ip(mesh), 9080, b"in") == b"mesh-inbound|in"
        assert mesh_in4.wait_one().original_dst == (pn.ip(mesh), 9080)

        # Pod without the annotation: straight to the peer, nothing captured.
        assert pn.tcp(plain, peer.ipv4, 8080, "direct") == "peer|direct"
        assert peer4.wait_one().peer[0] == pn.ip(plain)
        assert plain_out4.count() == 0

    sandboxes = set(pn.podman.sandbox_keys)
    assert len(sandboxes) == 2, "podman inspect gave no SandboxKey"
    problems = pn.podman.close()  # podman rm: CNI DEL through the whole chain
    assert problems == [], problems
    assert all(not os.path.exists(k) for k in sandboxes), "podman left its netns behind"
    assert root_links() - before == set()
    assert not any(os.path.exists(f"{h}{pn.podman.cgroup_parent}") for h in cgroup_hierarchies())
    # libcni's result cache (/var/lib/cni/results, not configurable in podman 4.3): DEL emptied ours.
    cache = Path("/var/lib/cni/results")
    assert not [f for f in (os.listdir(cache) if cache.is_dir() else []) if f.startswith(pn.network + "-")]
    left = node.netns.run(["ip", "-o", "link", "show", "master", node.bridge]).stdout.splitlines()
    assert len(left) == 1, f"podman's veths were not removed: {left}"  # only the harness peer's remains
    log = pn.plugin_log()
    assert [e for e in log if e.get("level") == "error"] == []
    dels = [e for e in log if e.get("cmd") == "DEL" and e.get("pod") in (mesh, plain) and e.get("step") == "done"]
    assert len(dels) == 2, dels


def test_podman_cni_args_from_environment_set_namespace(podman_node: PodmanNode) -> None:
    """Podman appends the pairs of CNI_ARGS in its own environment: a real namespace for the pod."""
    pn = podman_node
    pn.node.add_namespace("shop")
    pn.podman.extra_env["CNI_ARGS"] = "K8S_POD_NAMESPACE=shop"
    peer = pn.node.add_pod("default", unique("peer-", 8))
    name = unique("hr-shop-", 8)
    # A decoy: the same name in "default" without the annotation; finding it would mean no redirect.
    write_pod_object(pn.node.objects_dir, pod_object(PODMAN_DEFAULT_NAMESPACE, name))
    mesh = pn.start(name, namespace="shop", annotations={SIDECAR_STATUS: SIDECAR_STATUS_VALUE})
    with Listener(pn.podman.netns_path(mesh), 15001, label="shop-outbound") as out:
        assert pn.tcp(mesh, peer.ipv4, 8080, "x") == "shop-outbound|x"
        assert out.wait_one().original_dst == (peer.ipv4, 8080)
    adds = [e for e in pn.plugin_log() if e.get("cmd") == "ADD" and e.get("pod") == mesh]
    assert adds and all(e.get("namespace") == "shop" for e in adds)
