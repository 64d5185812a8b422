"""CNI environment and network-configuration parsing (cni.plugin.netconf)."""

from __future__ import annotations

import json

import pytest

from cni.contract import errors
from cni.contract.errors import CniError
from cni.plugin.cni_env import parse_cni_args, parse_env
from cni.plugin.netconf import parse_config

BASE_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc123", "CNI_IFNAME": "eth0", "CNI_NETNS": "/run/netns/x"}
PREV = {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24"}]}


def conf(**fields: object) -> bytes:
    base: dict[str, object] = {
        "cniVersion": "1.0.0",
        "name": "net",
        "type": "headrace-cni",
        "objects_dir": "/tmp/objects",
        "prevResult": PREV,
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def code_of(fn: object, *args: object) -> int:
    with pytest.raises(CniError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.code


def test_env_ok_with_k8s_args() -> None:
    env = parse_env(
        {
            **BASE_ENV,
            "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;"
            "K8S_POD_UID=0f1e-22;K8S_POD_INFRA_CONTAINER_ID=abc;FOO=bar",
        }
    )
    assert env.command == "ADD" and env.netns == "/run/netns/x"
    assert (env.k8s.namespace, env.k8s.name, env.k8s.uid, env.k8s.infra_container_id) == (
        "shop",
        "web-0",
        "0f1e-22",
        "abc",
    )
    assert env.k8s.known and not env.k8s.namespace_assumed


@pytest.mark.parametrize(
    "change",
    [
        {"CNI_COMMAND": ""},
        {"CNI_COMMAND": "FROB"},
        {"CNI_CONTAINERID": ""},
        {"CNI_CONTAINERID": "-bad"},
        {"CNI_CONTAINERID": "a;rm -rf /"},
        {"CNI_IFNAME": ""},
        {"CNI_IFNAME": "eth0/evil"},
        {"CNI_IFNAME": "a" * 16},
        {"CNI_NETNS": ""},
        {"CNI_NETNS": "relative/path"},
        {"CNI_ARGS": "novalue"},
        {"CNI_ARGS": "K8S_POD_NAMESPACE=Bad_NS;K8S_POD_NAME=x"},
        {"CNI_ARGS": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=bad name"},
        {"CNI_ARGS": "K8S_POD_NAMESPACE=ns"},
        {"CNI_ARGS": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=x;K8S_POD_UID=$(id)"},
        {"CNI_ARGS": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=x;K8S_POD_INFRA_CONTAINER_ID=a b"},
    ],
)
def test_env_invalid_is_code_7(change: dict[str, str]) -> None:
    assert code_of(parse_env, {**BASE_ENV, **change}) == errors.INVALID_ENV


def test_del_allows_empty_netns_and_version_needs_nothing() -> None:
    env = parse_env({**BASE_ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""})
    assert env.netns == ""
    assert parse_env({"CNI_COMMAND": "VERSION"}).command == "VERSION"


def test_podman_style_args_assume_default_namespace() -> None:
    k8s = parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=web")
    assert (k8s.namespace, k8s.name, k8s.namespace_assumed) == ("default", "web", True)
    # a container name that is no Kubernetes name: no pod identity, not an error
    assert not parse_cni_args("K8S_POD_NAME=My_Container").known
    assert not parse_cni_args("").known


def test_config_defaults() -> None:
    c = parse_config(conf(), "ADD")
    assert c.cni_version == "1.0.0" and c.objects_dir == "/tmp/objects"
    assert c.backend == "auto" and c.iptables == "auto" and c.exclude_namespaces == ("kube-system",)
    assert c.agent_socket == "/var/run/headrace/cni.sock" and c.agent_timeout == 25.0
    assert c.prev_result == PREV


def test_config_all_fields() -> None:
    c = parse_config(
        conf(
            cniVersion="1.1.0",
            objects_dir=...,
            kubeconfig="/etc/kube.json",
            agent_socket="/run/a.sock",
            backend="ebpf",
            iptables="nft",
            exclude_namespaces=["kube-system", "infra"],
            log_file="/tmp/l.log",
            log_level="debug",
            agent_timeout=3,
            api_timeout=1.5,
            **{"cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}]},
        ),
        "GC",
    )
    assert c.kubeconfig == "/etc/kube.json" and c.objects_dir is None
    assert (c.backend, c.iptables, c.log_level, c.agent_timeout, c.api_timeout) == ("ebpf", "nft", "debug", 3.0, 1.5)
    assert c.exclude_namespaces == ("kube-system", "infra")
    assert c.valid_attachments is not None and c.valid_attachments[0].container_id == "c1"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", errors.DECODE_FAILURE),
        (b"{not json", errors.DECODE_FAILURE),
        (b"[1,2]", errors.DECODE_FAILURE),
        (b"\xff\xfe", errors.DECODE_FAILURE),
        (conf(cniVersion="0.2.0"), errors.INCOMPATIBLE_VERSION),
        (conf(cniVersion="9.9.9"), errors.INCOMPATIBLE_VERSION),
        (conf(cniVersion=1), errors.INVALID_NETWORK_CONFIG),
        (conf(cniVersion=...), errors.INVALID_NETWORK_CONFIG),
        (conf(name=...), errors.INVALID_NETWORK_CONFIG),
        (conf(type=5), errors.INVALID_NETWORK_CONFIG),
        (conf(prevResult=...), errors.INVALID_NETWORK_CONFIG),
        (conf(prevResult=[1]), errors.INVALID_NETWORK_CONFIG),
        (conf(objects_dir=...), errors.INVALID_NETWORK_CONFIG),
        (conf(objects_dir="relative"), errors.INVALID_NETWORK_CONFIG),
        (conf(kubeconfig="/k"), errors.INVALID_NETWORK_CONFIG),
        (conf(backend="bpf"), errors.INVALID_NETWORK_CONFIG),
        (conf(iptables=True), errors.INVALID_NETWORK_CONFIG),
        (conf(exclude_namespaces="kube-system"), errors.INVALID_NETWORK_CONFIG),
        (conf(exclude_namespaces=["ok", "Not OK"]), errors.INVALID_NETWORK_CONFIG),
        (conf(agent_timeout="5"), errors.INVALID_NETWORK_CONFIG),
        (conf(agent_timeout=True), errors.INVALID_NETWORK_CONFIG),
        (conf(agent_timeout=0), errors.INVALID_NETWORK_CONFIG),
        (conf(log_level="loud"), errors.INVALID_NETWORK_CONFIG),
        (conf(**{"cni.dev/valid-attachments": [{"containerID": 1}]}), errors.INVALID_NETWORK_CONFIG),
    ],
)
def test_config_invalid(data: bytes, code: int) -> None:
    assert code_of(parse_config, data, "ADD") == code


def test_del_without_prev_result_is_fine() -> None:
    assert parse_config(conf(prevResult=...), "DEL").prev_result is None
