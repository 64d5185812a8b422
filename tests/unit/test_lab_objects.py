"""The lab's Namespace/Pod objects read back through the one parser as the agent and the plugin see them."""

from __future__ import annotations

import json
from pathlib import Path

from node_agent.lab.objects import ns_object, pod_object, write_object
from node_agent.sources.objects_dir import read_objects_dir

from cni.contract.kube_objects import Namespace, namespace_from_object, pod_from_object
from cni.plugin.pod_source import ObjectsDirSource


def test_objects_parse_as_written(tmp_path: Path) -> None:
    write_object(tmp_path, "ns.json", ns_object("shop", ambient=True, labels={"team": "a"}))
    obj = pod_object("shop", "web", "u-1", ["10.1.0.2", "fd00::2"], {"app": "web"}, "node-1",
                     annotations={"sidecar.istio.io/status": "{}"}, host_network=True)  # fmt: skip
    write_object(tmp_path, "pod.json", obj)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    pod = pod_from_object(json.loads((tmp_path / "pod.json").read_text()))
    assert (pod.uid, pod.namespace, pod.name, pod.node_name, pod.ips) == (
        "u-1", "shop", "web", "node-1", ("10.1.0.2", "fd00::2"),
    )  # fmt: skip
    assert pod.host_network and pod.labels == {"app": "web"} and pod.phase == "Running"
    assert pod.annotations == {"sidecar.istio.io/status": "{}"}
    ns = namespace_from_object(ns_object("shop", ambient=True, labels={"team": "a"}))
    assert ns == Namespace("shop", {"team": "a", "istio.io/dataplane-mode": "ambient"})
    # the agent's objects-dir source and the plugin's read the same records
    pods, namespaces = read_objects_dir(tmp_path)
    assert pods == [pod] and namespaces == [ns]
    assert ObjectsDirSource(str(tmp_path)).get_pod("shop", "web") == pod


def test_pod_without_ips(tmp_path: Path) -> None:
    pod = pod_from_object(pod_object("shop", "web", "u-2", []))
    assert pod.ips == () and not pod.host_network and pod.annotations == {}
