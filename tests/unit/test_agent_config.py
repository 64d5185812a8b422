from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from node_agent.agent.config import ConfigError, MetricsAddr, build_config, parse_metrics_addr


def test_defaults_from_state_dir(tmp_path: Path) -> None:
    cfg = build_config(objects_dir=tmp_path, state_dir=tmp_path / "state")
    assert cfg.cni_socket == tmp_path / "state" / "cni.sock"
    assert cfg.proxy_socket == tmp_path / "state" / "proxy.sock"
    assert cfg.netns_dir == tmp_path / "state" / "netns"
    assert cfg.exclude_namespaces == ("kube-system",)
    assert cfg.metrics_addr is None
    assert (cfg.backend, cfg.iptables) == ("auto", "auto")


def test_default_state_dir_is_contract_path(tmp_path: Path) -> None:
    cfg = build_config(objects_dir=tmp_path)
    assert str(cfg.cni_socket) == "/var/run/headrace/cni.sock"
    assert str(cfg.proxy_socket) == "/var/run/headrace/proxy.sock"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one pod source"),
        ({"objects_dir": "/nonexistent-dir-x"}, "not a directory"),
        ({"kubeconfig": "/nonexistent-kcfg", "node_name": "n"}, "does not exist"),
        ({"backend": "bogus"}, "--backend"),
        ({"iptables": "xt"}, "--iptables"),
        ({"log_level": "loud"}, "--log-level"),
        ({"exclude_namespaces": "ok,Bad_NS"}, "not a valid namespace"),
        ({"metrics_addr": "nonsense"}, "HOST:PORT"),
        ({"cni_socket": "/tmp/" + "x" * 120}, "108 bytes"),
        ({"cni_add_timeout": 0.0}, "seconds"),
    ],
)
def test_invalid_settings_are_refused(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    if "objects_dir" not in kwargs and "kubeconfig" not in kwargs and kwargs:
        kwargs = {"objects_dir": tmp_path, **kwargs}
    with pytest.raises(ConfigError, match=message):
        build_config(**kwargs)


def test_kubeconfig_needs_node_name(tmp_path: Path) -> None:
    kcfg = tmp_path / "kubeconfig"
    kcfg.write_text("{}")
    with pytest.raises(ConfigError, match="--node-name"):
        build_config(kubeconfig=kcfg)
    cfg = build_config(kubeconfig=kcfg, node_name="worker-1")
    assert cfg.node_name == "worker-1"


def test_same_socket_twice_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must differ"):
        build_config(objects_dir=tmp_path, cni_socket=tmp_path / "s", proxy_socket=tmp_path / "s")


def test_metrics_addr_forms() -> None:
    assert parse_metrics_addr("127.0.0.1:9090") == MetricsAddr("127.0.0.1", 9090)
    assert parse_metrics_addr("0.0.0.0:15114") == MetricsAddr("0.0.0.0", 15114)  # IPv4 only, as asked
    assert parse_metrics_addr("[::1]:1") == MetricsAddr("::1", 1)
    assert parse_metrics_addr("off") is None
    with pytest.raises(ConfigError):
        parse_metrics_addr("1.2.3.4:99999")


@pytest.mark.parametrize("value", ["[::]:15114", ":15114", " [::]:15114 "])
def test_metrics_addr_all_interfaces_is_the_v6_any_address(value: str) -> None:
    """`[::]:PORT` (the ConfigMap's default) and `:PORT` mean every interface: `::`, which the health
    listener binds dual-stack."""
    assert parse_metrics_addr(value) == MetricsAddr("::", 15114)


@pytest.mark.parametrize("value", ["[::]", "[::]:", "[::]:port", "[nonsense]:1", "[::]:65536"])
def test_metrics_addr_bad_v6_forms_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="--metrics-addr"):
        parse_metrics_addr(value)


def test_exclude_namespaces_list(tmp_path: Path) -> None:
    cfg = build_config(objects_dir=tmp_path, exclude_namespaces="kube-system, istio-system,,kube-system")
    assert cfg.exclude_namespaces == ("kube-system", "istio-system")


def test_dns_capture_is_off_unless_asked(tmp_path: Path) -> None:
    assert build_config(objects_dir=tmp_path).capture_dns is False
    assert build_config(objects_dir=tmp_path, capture_dns=True).capture_dns is True
