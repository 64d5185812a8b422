"""The plugin's kubeconfig from the service account: readable by the plugin, private, kept fresh."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from node_agent.cli import main as cli
from node_agent.install_cni import kubeconfig, service
from node_agent.install_cni.settings import PluginSettings

from cni.plugin.kube_api import parse_kubeconfig

DATA = Path(__file__).parent.parent / "data" / "conflists"
CA = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
ENV = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}


@pytest.fixture
def sa_dir(tmp_path: Path) -> Path:
    d = tmp_path / "sa"
    d.mkdir()
    (d / "token").write_text("tok-1\n")
    (d / "ca.crt").write_bytes(CA)
    return d


def test_render_is_read_by_the_plugin_parser():
    creds = parse_kubeconfig(kubeconfig.render("https://10.96.0.1:443", CA, "abc").decode(), "/")
    assert creds.server == "https://10.96.0.1:443"
    assert creds.token == "abc" and creds.ca_data == CA


def test_api_server_from_env():
    assert kubeconfig.api_server(ENV) == "https://10.96.0.1:443"
    assert kubeconfig.api_server({"KUBERNETES_SERVICE_HOST": "fd00::1"}) == "https://[fd00::1]:443"
    with pytest.raises(kubeconfig.KubeconfigError):
        kubeconfig.api_server({})


def test_cli_write_kubeconfig(tmp_path, sa_dir, monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    conf = tmp_path / "etc" / "cni" / "net.d"
    conf.mkdir(parents=True)
    shutil.copy(DATA / "10-containerd-net.conflist", conf)
    res = CliRunner().invoke(cli, ["install-cni", "--host-root", str(tmp_path), "--skip-plugin",
                                   "--write-kubeconfig", "--service-account-dir", str(sa_dir)])
    assert res.exit_code == 0, res.output
    entry = json.loads((conf / "10-containerd-net.conflist").read_text())["plugins"][-1]
    assert entry["kubeconfig"] == "/opt/headrace/kubeconfig" and "objects_dir" not in entry
    kc = tmp_path / "opt" / "headrace" / "kubeconfig"
    assert kc.stat().st_mode & 0o777 == 0o600
    assert parse_kubeconfig(kc.read_text(), "/").token == "tok-1"
    res = CliRunner().invoke(cli, ["uninstall-cni", "--host-root", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert not kc.exists()


def test_rotated_token_reaches_the_host_within_a_second(tmp_path, sa_dir):
    conf = tmp_path / "etc" / "cni" / "net.d"
    conf.mkdir(parents=True)
    shutil.copy(DATA / "87-podman-bridge.conflist", conf)
    opts = service.InstallOptions(
        host_root=str(tmp_path), install_plugin=False, service_account_dir=str(sa_dir), environ=ENV,
        settings=PluginSettings(kubeconfig="/opt/headrace/kubeconfig"),
    )
    kc = tmp_path / "opt" / "headrace" / "kubeconfig"
    stop = threading.Event()
    t = threading.Thread(target=service.watch, args=(opts, stop))
    t.start()
    try:
        deadline = time.monotonic() + 2
        while not kc.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert parse_kubeconfig(kc.read_text(), "/").token == "tok-1"
        tmp = sa_dir / ".token.new"
        tmp.write_text("tok-2\n")
        os.rename(tmp, sa_dir / "token")
        start = time.monotonic()
        while parse_kubeconfig(kc.read_text(), "/").token != "tok-2":
            assert time.monotonic() - start < 1.5, "token not refreshed"
            time.sleep(0.05)
    finally:
        stop.set()
        t.join(5)
