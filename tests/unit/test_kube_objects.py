"""The one Kubernetes object parser (cni.contract.kube_objects), used by the CNI plugin and the agent."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from cni.contract.kube_objects import (
    Namespace,
    ObjectError,
    Pod,
    derived_uid,
    namespace_from_object,
    pod_from_object,
    valid_uid,
)

REPO = str(Path(__file__).resolve().parents[2])
UID = "0b1c2d3e-aaaa-bbbb-cccc-000000000001"


def pod_obj(**meta: Any) -> dict[str, Any]:
    return {"kind": "Pod", "metadata": {"name": "web", "namespace": "shop", **meta}}


def test_full_pod() -> None:
    pod = pod_from_object(
        {
            "metadata": {
                "name": "web",
                "namespace": "shop",
                "uid": UID,
                "labels": {"app": "web"},
                "annotations": {"a": "b"},
                "deletionTimestamp": "2026-01-01T00:00:00Z",
            },
            "spec": {"hostNetwork": True, "nodeName": "n1", "serviceAccountName": "sa"},
            "status": {
                "phase": "Running",
                "podIP": "10.1.0.2",
                "podIPs": [{"ip": "10.1.0.2"}, {"ip": "fd00::2"}, {"ip": "fd00::2"}],
            },
        }
    )
    assert pod == Pod(
        uid=UID,
        namespace="shop",
        name="web",
        labels={"app": "web"},
        annotations={"a": "b"},
        host_network=True,
        node_name="n1",
        ips=("10.1.0.2", "fd00::2"),
        phase="Running",
        service_account="sa",
        deleting=True,
    )
    assert pod.authoritative_uid == UID and not pod.uid_derived


def test_defaults() -> None:
    pod = pod_from_object({"metadata": {"name": "web", "uid": UID}})
    assert (pod.namespace, pod.labels, pod.annotations, pod.ips) == ("default", {}, {}, ())
    assert (pod.host_network, pod.node_name, pod.phase, pod.service_account, pod.deleting) == (
        False, "", "", "default", False,
    )  # fmt: skip
    legacy = pod_from_object({"metadata": {"name": "w", "uid": UID}, "spec": {"serviceAccount": "old"}})
    assert legacy.service_account == "old"


def test_ips_pod_ip_goes_first_when_pod_ips_lack_it() -> None:
    status = {"podIP": "10.1.0.3", "podIPs": [{"ip": "fd00::3"}, {"ip": ""}, "junk"]}
    assert pod_from_object({**pod_obj(uid=UID), "status": status}).ips == ("10.1.0.3", "fd00::3")


def test_host_network_counts_only_when_true() -> None:
    assert not pod_from_object({**pod_obj(uid=UID), "spec": {"hostNetwork": "true"}}).host_network


def test_uid_rule_derives_a_stable_uid_when_absent() -> None:
    pod = pod_from_object(pod_obj())
    assert pod.uid == str(uuid.uuid5(uuid.NAMESPACE_URL, "headrace:shop/web")) == derived_uid("shop", "web")
    assert pod.uid_derived and pod.authoritative_uid == ""
    assert pod_from_object(pod_obj(uid="")).uid == pod.uid
    assert pod_from_object({"metadata": {"name": "web"}}).uid == derived_uid("default", "web")


@pytest.mark.parametrize("uid", ["../../etc", ".hidden", "a/b", "x" * 129, 5, "a b"])
def test_uid_must_be_safe_for_paths(uid: object) -> None:
    with pytest.raises(ObjectError, match=r"invalid metadata\.uid"):
        pod_from_object(pod_obj(uid=uid))


def test_valid_uid() -> None:
    assert valid_uid(UID) and valid_uid("a") and valid_uid("A._-" + "x" * 124)
    assert not valid_uid("") and not valid_uid("-a") and not valid_uid("é")


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([], "not a JSON/YAML object"),
        ({"metadata": None}, "no metadata"),
        ({"metadata": {"name": ""}}, r"no metadata\.name"),
        ({"metadata": {"name": 3}}, r"no metadata\.name"),
        ({"metadata": {"name": "w", "namespace": 1}}, "namespace must be a string"),
        ({"metadata": {"name": "w", "labels": {"a": 1}}}, "map of strings"),
        ({"metadata": {"name": "w", "annotations": ["x"]}}, "map of strings"),
        ({"metadata": {"name": "w"}, "spec": ["x"]}, "spec is not an object"),
        ({"metadata": {"name": "w"}, "status": "x"}, "status is not an object"),
    ],
)
def test_malformed_pods(obj: Any, message: str) -> None:
    with pytest.raises(ObjectError, match=message):
        pod_from_object(obj)


def test_namespace() -> None:
    assert namespace_from_object({"metadata": {"name": "shop", "labels": {"x": "y"}}}) == Namespace("shop", {"x": "y"})
    assert namespace_from_object({"metadata": {"name": "shop"}}).labels == {}
    with pytest.raises(ObjectError, match="map of strings"):
        namespace_from_object({"metadata": {"name": "shop", "labels": {"x": None}}})


def test_with_ips_and_immutability() -> None:
    pod = pod_from_object(pod_obj())
    moved = pod.with_ips(("10.0.0.9",))
    assert moved.ips == ("10.0.0.9",) and moved.uid == pod.uid and moved.uid_derived
    with pytest.raises(AttributeError):
        pod.name = "x"


def test_the_agent_and_the_plugin_share_the_record_type() -> None:


    assert Pod is Pod and Namespace is Namespace


def test_parsing_a_pod_with_a_uid_stays_lean() -> None:
    code = (
        "import sys\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "before = set(sys.modules)\n"
        "from cni.contract.kube_objects import pod_from_object\n"
        "pod_from_object({'metadata': {'name': 'w', 'uid': 'u1', 'labels': {'a': 'b'}}})\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True)
    tops = {m.split(".")[0] for m in out.stdout.split()}
    assert tops <= {"__future__", "cni", "types"}, tops
