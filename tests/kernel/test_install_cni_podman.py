"""A real runtime runs the installed plugin: podman 4.3 (CNI backend, isolated, inside a simulated node's
netns) uses the network config install-cni chained headrace-cni into, and executes the launcher from the
CNI bin dir install-cni wrote (the copied runtime, not the venv). Sidecar redirect seen with real TCP
from inside the container; `podman rm` runs DEL through the chain cleanly; uninstall restores the config."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from node_agent.install_cni import runtime
from node_agent.install_cni.service import InstallOptions, install_once, uninstall
from node_agent.install_cni.settings import PluginSettings

from tests.harness.netns import unique
from tests.harness.node import SimNode
from tests.harness.traffic import Listener
from tests.podman_support.isolated import IsolatedPodman
from tests.podman_support.pods import (
    PODMAN_DEFAULT_NAMESPACE,
    SIDECAR_STATUS,
    SIDECAR_STATUS_VALUE,
    pod_object,
    write_pod_object,
)
from tests.podman_support.rootfs import bash_tcp_client, build_rootfs

pytestmark = [pytest.mark.kernel, pytest.mark.podman]


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("HEADRACE_REQUIRE_PODMAN") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def test_podman_uses_the_installed_chain(make_node: Callable[..., SimNode], tmp_path: Path) -> None:
    for binary in ("podman", "runc", "nsenter"):
        if shutil.which(binary) is None:
            _skip_or_fail(f"{binary} is not installed")
    node = make_node(headrace=None)  # the node's own network: bridge + host-local, no headrace
    node.add_namespace(PODMAN_DEFAULT_NAMESPACE)
    bin_dir, install_dir = tmp_path / "cni-bin", tmp_path / "headrace"
    pm = IsolatedPodman.create(tmp_path / "pm", node_netns=node.netns.path, extra_plugin_dirs=[str(bin_dir)])
    try:
        probe = pm.probe(unique("hr-probe-", 8), build_rootfs(tmp_path / "rootfs-probe"))
        if probe.returncode != 0:
            _skip_or_fail(f"podman cannot run a container here: {probe.stderr.strip()[-300:]}")
        network = pm.write_network(node.conflist())
        conf_file = pm.paths.net_dir / f"{network}.conflist"
        original = json.loads(conf_file.read_text())
        opts = InstallOptions(
            cni_conf_dir=str(pm.paths.net_dir), cni_bin_dir=str(bin_dir), install_dir=str(install_dir),
            settings=PluginSettings(objects_dir=str(node.objects_dir), log_file=str(node.log_file),
                                    agent_socket=str(node.agent_socket), log_level="debug"),
        )
        assert install_once(opts).path == str(conf_file)
        assert runtime.is_our_launcher(str(bin_dir / "headrace-cni"))

        peer = node.add_pod("default", unique("peer-", 8))
        names = {"mesh": unique("hr-mesh-", 8), "plain": unique("hr-plain-", 8)}
        for kind, name in names.items():
            annotations = {SIDECAR_STATUS: SIDECAR_STATUS_VALUE} if kind == "mesh" else None
            write_pod_object(node.objects_dir, pod_object(PODMAN_DEFAULT_NAMESPACE, name, annotations=annotations,
                                                          node_name=node.netns.name))
            pm.run_container(name, build_rootfs(tmp_path / f"rootfs-{kind}"), network=network,
                             command=["/bin/sleep", "600"])

        def tcp(name: str, payload: str, user: str | None = None) -> str:
            proc = pm.exec(name, bash_tcp_client(peer.ipv4, 8080, payload), user=user)
            assert proc.returncode == 0, proc.stderr
            return proc.stdout

        with (
            Listener(peer.netns.path, 8080, label="peer") as peer_l,
            Listener(pm.netns_path(names["mesh"]), 15001, label="mesh-out") as mesh_out,
            Listener(pm.netns_path(names["plain"]), 15001, label="plain-out") as plain_out,
        ):
            assert tcp(names["mesh"], "a") == "mesh-out|a"
            assert mesh_out.wait_one().original_dst == (peer.ipv4, 8080)
            assert tcp(names["mesh"], "p", user="1337:1337") == "peer|p"
            assert tcp(names["plain"], "d") == "peer|d"
            assert plain_out.count() == 0 and peer_l.count() == 2

        for name in names.values():  # podman rm: DEL through bridge + the installed headrace-cni
            pm.run(["rm", "--force", "--time", "0", name])
        log = [json.loads(line) for line in node.log_file.read_text().splitlines() if line.strip()]
        assert not [e for e in log if e.get("level") == "error"], log
        dels = [e for e in log if e.get("cmd") == "DEL" and e.get("pod") in names.values()]
        assert {e["pod"] for e in dels} == set(names.values())

        uninstall(opts)
        assert json.loads(conf_file.read_text()) == original
        assert not (bin_dir / "headrace-cni").exists() and not install_dir.exists()
        assert pm.close() == []
    finally:
        pm.close()
