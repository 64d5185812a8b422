"""The agent's Kubernetes client config: in-cluster (service account, token refreshed when rotated) when
no kubeconfig is given, the kubeconfig file otherwise; and `--in-cluster` in the agent's settings."""

from __future__ import annotations

import datetime
import json
import types
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.config import incluster_config
from node_agent.agent.config import ConfigError, build_config
from node_agent.sources.kubernetes import load_client_config


@pytest.fixture
def service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "token").write_text("token-1")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(tmp_path / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(tmp_path / "ca.crt"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    return tmp_path


def test_in_cluster_config_refreshes_a_rotated_token(service_account: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = client.Configuration()
    load_client_config(cfg, None)
    assert cfg.host == "https://10.96.0.1:443"
    assert cfg.ssl_ca_cert == str(service_account / "ca.crt")
    assert cfg.api_key["BearerToken"].endswith("token-1")
    assert cfg.refresh_api_key_hook is not None

    # the kubelet rotates the projected token; a minute later the client reads the new one
    (service_account / "token").write_text("token-2")
    later = datetime.datetime.now() + datetime.timedelta(minutes=2)

    class Later(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> Later:
            return cls.fromtimestamp(later.timestamp(), tz)

    monkeypatch.setattr(incluster_config, "datetime", types.SimpleNamespace(datetime=Later,
                                                                            timedelta=datetime.timedelta))
    cfg.refresh_api_key_hook(cfg)
    assert cfg.api_key["BearerToken"].endswith("token-2")


def test_kubeconfig_file_when_given(tmp_path: Path) -> None:
    kcfg = tmp_path / "kubeconfig"
    kcfg.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": "http://127.0.0.1:6443"}}],
        "users": [{"name": "t", "user": {"token": "file-token"}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
    }))
    cfg = client.Configuration()
    load_client_config(cfg, kcfg)
    assert cfg.host == "http://127.0.0.1:6443"
    assert any(str(v).endswith("file-token") for v in cfg.api_key.values())


def test_agent_settings_in_cluster() -> None:
    cfg = build_config(in_cluster=True, node_name="worker-1")
    assert cfg.in_cluster and cfg.kubeconfig is None and cfg.objects_dir is None
    with pytest.raises(ConfigError, match="--in-cluster needs --node-name"):
        build_config(in_cluster=True)
    with pytest.raises(ConfigError, match="exactly one pod source"):
        build_config(in_cluster=True, objects_dir="/", node_name="n")
