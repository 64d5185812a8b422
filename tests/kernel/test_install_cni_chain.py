"""install-cni end to end on a simulated node: the node's bridge conflist gets our entry, pods are then
created through exactly that installed chain (bridge + host-local + the installed headrace-cni launcher
running on its own copied runtime), and real TCP shows the sidecar pod redirected and the plain pod not.
Then uninstall-cni leaves the node's conflist as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from node_agent.install_cni import runtime
from node_agent.install_cni.service import InstallOptions, install_once, uninstall
from node_agent.install_cni.settings import PluginSettings

from tests.harness.node import SimNode
from tests.harness.traffic import Listener, tcp_request

pytestmark = pytest.mark.kernel

SIDECAR = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}


def test_installed_chain_redirects_sidecar_pod(plain_node: SimNode, tmp_path: Path) -> None:
    node = plain_node
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    original = node.conflist()
    (conf_dir / "10-bridge.conflist").write_text(json.dumps(original, indent=2))
    # the node's plugin dir gets our launcher instead of the venv's console script
    bin_dir = node.root / "bin"
    (bin_dir / "headrace-cni").unlink()
    opts = InstallOptions(
        cni_conf_dir=str(conf_dir), cni_bin_dir=str(bin_dir), install_dir=str(tmp_path / "headrace"),
        settings=PluginSettings(objects_dir=str(node.objects_dir), log_file=str(node.log_file),
                                agent_socket=str(node.agent_socket)),
    )
    assert install_once(opts).action == "inserted"
    assert runtime.is_our_launcher(str(bin_dir / "headrace-cni"))
    installed = json.loads((conf_dir / "10-bridge.conflist").read_text())
    assert installed["plugins"][:-1] == original["plugins"]
    entry = dict(installed["plugins"][-1])
    entry.pop("type")
    node.headrace = entry
    assert node.conflist() == installed  # the pods below go through exactly the installed chain

    app = node.add_pod("shop", "app", annotations=SIDECAR)
    peer = node.add_pod("plain", "peer")
    with (
        Listener(app.netns.path, 15001, label="out") as out,
        Listener(peer.netns.path, 8080, label="peer") as peerl,
        Listener(app.netns.path, 15006, label="in") as inb,
        Listener(app.netns.path, 8080, label="app") as appl,
        Listener(app.netns.path, 15021, label="health"),
        Listener(peer.netns.path, 15001, label="peer-out") as peer_out,
    ):
        assert tcp_request(app.netns.path, peer.ipv4, 8080, b"o") == b"out|o"
        assert out.wait_one().original_dst == (peer.ipv4, 8080)
        assert tcp_request(app.netns.path, peer.ipv4, 8080, b"p", uid=1337, gid=1337) == b"peer|p"
        assert tcp_request(peer.netns.path, app.ipv4, 8080, b"i") == b"in|i"  # inbound captured
        assert inb.wait_one().original_dst == (app.ipv4, 8080)
        # the proxy uid (1337) of the sidecar pod reaches the plain pod directly
        assert peerl.count() == 1 and appl.count() == 0
        # the plain pod's outbound is not redirected (its 15001 gets nothing); 15021 is excluded inbound
        assert tcp_request(peer.netns.path, app.ipv4, 15021, b"h") == b"health|h"
        assert peer_out.count() == 0
    log = node.log_file.read_text()
    assert '"mode": "sidecar"' in log or "mode sidecar" in log

    node.remove_pod(app)
    node.remove_pod(peer)
    uninstall(opts)
    assert json.loads((conf_dir / "10-bridge.conflist").read_text()) == original
    assert not (bin_dir / "headrace-cni").exists()
    assert not (tmp_path / "headrace").exists()
