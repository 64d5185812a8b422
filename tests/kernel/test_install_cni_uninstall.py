"""Uninstall when the DaemonSet goes away, keep on a rolling update — on a simulated node.

`headrace install-cni --watch --owner-daemonset headrace-agent` runs as in the DaemonSet's install-cni
container (host paths in a temp dir, a kubeconfig pointing at a small fake API server). While headrace
is chained and its API credentials are dead, a pod ADD through the node's chain fails (the broken node an
uninstall used to leave). On SIGTERM install-cni asks for its DaemonSet:

- gone (404), being deleted (deletionTimestamp) or our service account gone (403): the entry, the
  launcher and the runtime are removed, and then a pod ADD through the node's chain (real bridge +
  host-local) succeeds and the pod talks TCP;
- still there (a rolling update): everything stays chained; `headrace uninstall-cni` then removes it by
  hand and pods start again;
- never seen present since install-cni started (a wrong name, RBAC that never let it read the DaemonSet):
  a 404 or 403 is not taken for an uninstall, everything stays.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from node_agent.lab.cni_runner import CniInvocationError, CniRunner

from tests.harness.netns import NetNS
from tests.harness.node import SimNode
from tests.harness.traffic import Listener, tcp_request

pytestmark = pytest.mark.kernel

HEADRACE = str(Path(sys.executable).parent / "headrace")
TOKEN = "uninstall-test-token"
DS_PATH = "/apis/apps/v1/namespaces/headrace-system/daemonsets/headrace-agent"


class FakeApi:
    """Answers the DaemonSet GET as told (`present`, `deleting`, `gone`, `forbidden`); 404 for the rest."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                api.requests.append(self.path)
                code, body = api.answer(self.path, self.headers.get("Authorization", ""))
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, path: str, auth: str) -> tuple[int, dict[str, Any]]:
        if auth != f"Bearer {TOKEN}":
            return 401, {"kind": "Status", "code": 401}
        if path != DS_PATH:
            return 404, {"kind": "Status", "code": 404}
        meta: dict[str, Any] = {"name": "headrace-agent", "namespace": "headrace-system", "uid": "ds-uid"}
        if self.mode == "gone":
            return 404, {"kind": "Status", "code": 404}
        if self.mode == "forbidden":
            return 403, {"kind": "Status", "code": 403}
        if self.mode == "deleting":
            meta["deletionTimestamp"] = "2026-12-03T12:00:00Z"
        return 200, {"kind": "DaemonSet", "apiVersion": "apps/v1", "metadata": meta}

    def kubeconfig(self, path: Path) -> Path:
        port = self.httpd.server_address[1]
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "t",
            "clusters": [{"name": "t", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
            "users": [{"name": "t", "user": {"token": TOKEN}}],
            "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
        }))
        return path

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def installed(plain_node: SimNode, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """install-cni --watch chained into the node's conflist; yields paths, the process and the fake API. The
    DaemonSet is present at start (install-cni sees it), then answered as the parameter says; with a
    `never-` prefix it is never seen present."""
    mode = str(request.param)
    api = FakeApi(mode.removeprefix("never-") if mode.startswith("never-") else "present")
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    conf = conf_dir / "10-bridge.conflist"
    original = plain_node.conflist()
    conf.write_text(json.dumps(original, indent=2))
    bin_dir = plain_node.root / "bin"
    (bin_dir / "headrace-cni").unlink()
    install_dir = tmp_path / "headrace"
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    argv = [
        HEADRACE, "install-cni", "--watch", "--owner-daemonset", "headrace-agent",
        "--agent-namespace", "headrace-system", "--kubeconfig", str(kubeconfig),
        "--cni-conf-dir", str(conf_dir), "--cni-bin-dir", str(bin_dir), "--install-dir", str(install_dir),
        "--log-file", str(plain_node.log_file), "--agent-socket", str(plain_node.agent_socket),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while "headrace-cni" not in conf.read_text():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "install-cni did not chain the plugin"
            time.sleep(0.1)
        while DS_PATH not in api.requests:  # its look at start
            assert time.monotonic() < deadline, "install-cni did not look at its DaemonSet at start"
            time.sleep(0.1)
        time.sleep(0.2)
        api.mode = mode.removeprefix("never-")
        yield {"api": api, "proc": proc, "conf": conf, "original": original, "bin": bin_dir,
               "install_dir": install_dir, "conf_dir": conf_dir}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        api.close()
        subprocess.run([HEADRACE, "uninstall-cni", "--cni-conf-dir", str(conf_dir), "--cni-bin-dir", str(bin_dir),
                        "--install-dir", str(install_dir)], capture_output=True, check=False)


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return err


def add_fails_while_chained(node: SimNode, conflist: dict[str, Any]) -> None:
    """The node as a deleted DaemonSet used to leave it: every new pod outside the excluded namespaces
    fails ADD (no pod metadata: the plugin's credentials point at an API that no longer knows it)."""
    runner = CniRunner(conflist, node.cni_path, node.root / "cache", run_netns=node.netns.path)
    netns = NetNS.create("hrpod-")
    cid = secrets.token_hex(16)
    args = {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "early",
            "K8S_POD_UID": str(uuid.uuid4()), "K8S_POD_INFRA_CONTAINER_ID": cid}
    try:
        with pytest.raises(CniInvocationError) as info:
            runner.add(cid, netns.path, args=args)
        assert info.value.plugin == "headrace-cni"
        assert info.value.error is not None and info.value.error["code"] == 100
    finally:
        try:
            runner.delete(cid, netns.path, args=args)
        except (CniInvocationError, FileNotFoundError):
            pass
        netns.delete()


def pods_start_without_headrace(node: SimNode, conf: Path) -> None:
    node.headrace = None
    assert json.loads(conf.read_text()) == node.conflist()  # the node's chain, exactly
    web = node.add_pod("default", "web")
    client = node.add_pod("default", "client")
    with Listener(web.netns.path, 8080, label="web") as listener:
        assert tcp_request(client.netns.path, web.ipv4, 8080, b"x") == b"web|x"
        assert listener.count() == 1
    node.remove_pod(client)
    node.remove_pod(web)


@pytest.mark.parametrize("installed", ["gone", "deleting", "forbidden"], indirect=True)
def test_daemonset_going_away_uninstalls(plain_node: SimNode, installed: dict[str, Any]) -> None:
    add_fails_while_chained(plain_node, json.loads(installed["conf"].read_text()))
    err = stop(installed["proc"])
    assert "DaemonSet going away" in err
    assert DS_PATH in installed["api"].requests
    assert json.loads(installed["conf"].read_text()) == installed["original"]
    assert not (installed["bin"] / "headrace-cni").exists()
    assert not installed["install_dir"].exists()
    pods_start_without_headrace(plain_node, installed["conf"])


@pytest.mark.parametrize("installed", ["never-gone", "never-forbidden"], indirect=True)
def test_a_daemonset_never_seen_is_not_taken_for_gone(installed: dict[str, Any]) -> None:
    """A wrong --owner-daemonset or RBAC that never let install-cni read it: a restart must not uninstall."""
    chained = installed["conf"].read_text()
    err = stop(installed["proc"])
    assert "never seen since the start" in err and "cannot tell whether the DaemonSet is being deleted" in err
    assert installed["conf"].read_text() == chained
    assert (installed["bin"] / "headrace-cni").exists()


@pytest.mark.parametrize("installed", ["present"], indirect=True)
def test_rolling_update_keeps_plugin_then_manual_uninstall(plain_node: SimNode, installed: dict[str, Any]) -> None:
    def check() -> subprocess.CompletedProcess[str]:  # the install-cni container's readiness probe
        return subprocess.run([HEADRACE, "install-cni", "--check", "--cni-conf-dir", str(installed["conf_dir"]),
                               "--cni-bin-dir", str(installed["bin"])], capture_output=True, text=True, check=False)

    ready = check()
    assert ready.returncode == 0 and "ready" in ready.stdout, ready.stderr
    chained = installed["conf"].read_text()
    err = stop(installed["proc"])
    assert "DaemonSet still present" in err
    assert installed["conf"].read_text() == chained  # untouched for the next pod of the DaemonSet
    assert (installed["bin"] / "headrace-cni").exists()
    out = subprocess.run(
        [HEADRACE, "uninstall-cni", "--cni-conf-dir", str(installed["conf_dir"]), "--cni-bin-dir",
         str(installed["bin"]), "--install-dir", str(installed["install_dir"])],
        capture_output=True, text=True, check=True,
    ).stdout
    assert json.loads(out)["config"][0]["action"] == "removed"
    not_ready = check()
    assert not_ready.returncode == 1 and "no headrace-cni entry" in not_ready.stderr
    pods_start_without_headrace(plain_node, installed["conf"])
