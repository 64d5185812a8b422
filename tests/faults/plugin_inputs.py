"""Hypothesis strategies for the CNI plugin's inputs: the stdin netconf (valid, mutated field by field,
or garbage), the CNI_* environment, and the pod object (labels, annotations, hostNetwork) the pod source
returns. Shared by the in-process, kernel and subprocess fuzz runs (tests/faults/test_fuzz_plugin*.py)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Every fuzz run is reproducible: derandomized, no example database, no per-example deadline.
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.function_scoped_fixture],
)

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
ANNOTATION_KEYS = (
    "traffic.sidecar.istio.io/includeInboundPorts",
    "traffic.sidecar.istio.io/excludeInboundPorts",
    "traffic.sidecar.istio.io/includeOutboundPorts",
    "traffic.sidecar.istio.io/excludeOutboundPorts",
    "traffic.sidecar.istio.io/includeOutboundIPRanges",
    "traffic.sidecar.istio.io/excludeOutboundIPRanges",
    "traffic.sidecar.istio.io/excludeInterfaces",
    "traffic.sidecar.istio.io/kubevirtInterfaces",
    "sidecar.istio.io/interceptionMode",
)
SIDECAR_STATUS = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}

json_leaf = st.none() | st.booleans() | st.integers(-(2**63), 2**64) | st.floats(allow_nan=False) | st.text(max_size=20)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)

_port = st.integers(-5, 70000).map(str)
_cidr = st.sampled_from(["10.0.0.0/8", "0.0.0.0/0", "fd00::/8", "::/0", "10.1.2.3", "10.0.0.0/33", "1.2.3.4/0",
                         "fe80::1%eth0", "*", "256.0.0.0/8", "::ffff:10.0.0.1/128", ""])
_token = _port | _cidr | st.sampled_from(["*", "TPROXY", "REDIRECT", "NONE", "eth0", "lo", " ", ",", "80-90"])
annotation_value = st.one_of(
    st.lists(_token, max_size=6).map(",".join),
    st.lists(_token, max_size=4).map(" , ".join),
    st.text(alphabet="0123456789,./:-* abcdefTPROXYRDIEC\t\n", max_size=30),
    st.text(max_size=30),
)
pod_annotations = st.one_of(st.dictionaries(st.sampled_from(ANNOTATION_KEYS), annotation_value, max_size=4),
                        st.dictionaries(st.text(max_size=30), st.text(max_size=20), max_size=3))
labels = st.fixed_dictionaries({}, optional={
    "istio.io/dataplane-mode": st.sampled_from(["ambient", "none", "AMBIENT", "", "sidecar"]) | st.text(max_size=8)})

_ip4 = st.tuples(st.integers(0, 255), st.integers(0, 255)).map(lambda t: f"10.{t[0]}.{t[1]}.5/24")
_ip6 = st.integers(1, 0xFFFF).map(lambda n: f"fd00:{n:x}::5/64")
prev_ips = st.lists(st.one_of(
    _ip4.map(lambda a: {"interface": 0, "address": a, "gateway": a.split("/")[0].rsplit(".", 1)[0] + ".1"}),
    _ip6.map(lambda a: {"interface": 0, "address": a}),
    st.dictionaries(st.sampled_from(["address", "interface", "gateway", "version"]), json_leaf, max_size=3),
), min_size=0, max_size=3)


@st.composite
def pod_objects(draw: st.DrawFn) -> dict[str, Any]:
    """What the objects dir holds: the pod's mode inputs and its annotations."""
    ann = draw(pod_annotations)
    if draw(st.booleans()):
        ann = {**SIDECAR_STATUS, **ann}
    return {
        "labels": draw(labels),
        "annotations": ann,
        "host_network": draw(st.sampled_from([False, False, True, "true", 1])),
        "namespace_labels": draw(labels),
        "uid": draw(st.sampled_from(["uid-1", "uid-1", "", "../x", "u" * 200]) | st.text(max_size=10)),
    }


def write_objects(objects: Path, pod: dict[str, Any]) -> None:
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": pod["namespace_labels"]}}
    meta: dict[str, Any] = {"name": "web", "namespace": "shop", "labels": pod["labels"],
                            "annotations": pod["annotations"]}
    if pod["uid"]:
        meta["uid"] = pod["uid"]
    obj = {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
           "spec": {"containers": [{"name": "app"}], "hostNetwork": pod["host_network"]}}
    (objects / "ns-shop.json").write_text(json.dumps(ns))
    (objects / "pod-shop-web.json").write_text(json.dumps(obj))


def base_conf(tmp: Path, version: str, ips: list[Any]) -> dict[str, Any]:
    return {
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "headrace-cni",
        "iptables": "nft",
        "objects_dir": str(tmp / "objects"),
        "log_file": str(tmp / "cni.log"),
        "agent_socket": str(tmp / "agent.sock"),
        "agent_timeout": 2,
        "prevResult": {
            "cniVersion": version,
            "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:01", "sandbox": "/x"}],
            "ips": ips,
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {},
        },
    }


CONF_FIELDS = ("cniVersion", "name", "type", "iptables", "backend", "objects_dir", "kubeconfig", "agent_socket",
               "agent_timeout", "api_timeout", "exclude_namespaces", "log_level", "prevResult", "runtimeConfig",
               "valid_attachments", "cniVersions")


@st.composite
def stdin_bytes(draw: st.DrawFn, tmp: Path) -> bytes:
    """Mostly a real netconf with some fields replaced, removed or added; sometimes garbage."""
    kind = draw(st.sampled_from(["valid"] * 4 + ["mutated"] * 4 + ["json", "bytes", "deep"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(json_value)).encode()
    if kind == "deep":
        depth = draw(st.integers(100, 5000))
        return b'{"cniVersion": "1.0.0", "x": ' + b"[" * depth + b"]" * depth + b"}"
    conf = base_conf(tmp, draw(st.sampled_from(VERSIONS)), draw(prev_ips))
    if kind == "valid":
        return json.dumps(conf).encode()
    for field in draw(st.lists(st.sampled_from(CONF_FIELDS), max_size=3, unique=True)):
        action = draw(st.sampled_from(["replace", "remove", "replace-string"]))
        if action == "remove":
            conf.pop(field, None)
        elif action == "replace-string":
            conf[field] = draw(st.sampled_from(["", "auto", "legacy", "nft", "ebpf", "iptables", "0.4.0", "/", "x"])
                               | st.text(max_size=12))
        else:
            conf[field] = draw(json_value)
    if draw(st.booleans()) and isinstance(conf.get("prevResult"), dict):
        prev = conf["prevResult"]
        key = draw(st.sampled_from(["cniVersion", "interfaces", "ips", "routes", "dns"]))
        prev[key] = draw(json_value)
    return json.dumps(conf).encode()


VALID_ARGS = (
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_UID=uid-1",
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web",
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_UID=other",
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=web",
    "IgnoreUnknown=true;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=c0ffee",
)
ODD_ARGS = ("", "IgnoreUnknown=1", "K8S_POD_NAME=web", "=;;=", "K8S_POD_NAMESPACE=Shop;K8S_POD_NAME=web",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_UID=../../x",
            "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web")


@st.composite
def environments(draw: st.DrawFn, netns_choices: dict[str, str]) -> dict[str, str]:
    """The CNI_* variables: three in four well-formed (so the deeper paths run), else hostile fields."""
    if draw(st.integers(0, 3)):
        return {
            "CNI_COMMAND": draw(st.sampled_from(("ADD", "ADD", "ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"))),
            "CNI_CONTAINERID": "c0ffee",
            "CNI_NETNS": netns_choices[draw(st.sampled_from(["pod"] * 6 + sorted(netns_choices)))],
            "CNI_IFNAME": "eth0",
            "CNI_PATH": "/usr/lib/cni",
            "CNI_ARGS": draw(st.sampled_from(VALID_ARGS[:1] * 4 + VALID_ARGS)),
        }
    env = {
        "CNI_COMMAND": draw(st.sampled_from(COMMANDS) | st.text(max_size=8)),
        "CNI_CONTAINERID": draw(st.sampled_from(["c0ffee", "", "-x", "a/b", "x" * 2000]) | st.text(max_size=12)),
        "CNI_NETNS": netns_choices[draw(st.sampled_from(sorted(netns_choices)))],
        "CNI_IFNAME": draw(st.sampled_from(["eth0", "", "a/b", "x" * 20, "eth 0"]) | st.text(max_size=6)),
        "CNI_PATH": "/usr/lib/cni",
        "CNI_ARGS": draw(st.sampled_from(VALID_ARGS + ODD_ARGS) | st.text(max_size=40)),
    }
    for key in draw(st.lists(st.sampled_from(sorted(env)), max_size=2, unique=True)):
        if draw(st.booleans()):
            del env[key]
    return env


# ---- cheap mutations: many plugin runs per hypothesis example ------------------------------------------

ODD_VALUES: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 2**64, 1e308, -0.0, "", " ", "auto", "ebpf", "nft", "legacy", "0.4.0", "1.1.0",
    "9.9.9", [], {}, [None], {"": None}, ["kube-system", 5], {"ips": []}, "\u0000", "x" * 5000, [[[[[]]]]],
)
ODD_ENV: tuple[str, ...] = ("", " ", "ADD", "DEL", "CHECK", "VERSION", "x" * 5000, "\u00e9", "a=b;c", "/", "-",
                            "eth0", "K8S_POD_NAME=web", "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web")


def mutate_stdin(rng: Any, stdin: bytes, bend_bytes: bool = True) -> bytes:
    """A field of the netconf (or of its prevResult) replaced or removed, or (`bend_bytes`) the bytes
    themselves bent. Bent bytes can turn `log_file` into any path: only runs whose log is pinned
    (`PinnedLog`, in-process) may use them."""
    how = rng.randrange(4 if bend_bytes else 3)
    if how == 3 or (bend_bytes and not stdin.startswith(b"{")):
        data = bytearray(stdin)
        for _ in range(rng.randrange(1, 4)):
            if not data:
                break
            i = rng.randrange(len(data))
            op = rng.randrange(3)
            if op == 0:
                data[i] = rng.randrange(256)
            elif op == 1:
                del data[i]
            else:
                data.insert(i, rng.choice(b'{}[]",:0\\n\xff'))
        return bytes(data)
    try:
        conf = json.loads(stdin)
    except (ValueError, RecursionError):
        return stdin
    if not isinstance(conf, dict):
        return stdin
    target = conf
    if how == 2 and isinstance(conf.get("prevResult"), dict):
        target = conf["prevResult"]
    keys = [k for k in sorted(target) if k != "log_file"] + list(CONF_FIELDS)
    key = rng.choice(keys)
    if how == 1:
        target.pop(key, None)
    else:
        target[key] = rng.choice(ODD_VALUES)
    return json.dumps(conf).encode()


def mutate_env(rng: Any, env: dict[str, str], netns_paths: Sequence[str]) -> dict[str, str]:
    out = dict(env)
    key = rng.choice(("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"))
    if rng.randrange(5) == 0:
        out.pop(key, None)
    elif key == "CNI_NETNS":
        out[key] = rng.choice(netns_paths)
    else:
        out[key] = rng.choice(ODD_ENV)
    return out
