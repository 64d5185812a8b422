"""Pure: which pods on this node the agent enrols, and in which mode.

The rules (the contract): host-network pods and excluded namespaces are never touched; pods with an
injected sidecar (`sidecar.istio.io/status`) are left to the sidecar path; a pod label
`istio.io/dataplane-mode=none` opts a pod out; the same label set to `ambient` on the pod or on its
namespace enrols it. The decision itself is `cni.contract.membership.pod_mode`, shared with the plugin, so the
plugin and the agent always agree; the agent adds only its own checks (finished pods).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from cni.contract import membership
from cni.contract.kube_objects import Namespace, Pod
from node_agent.sources.store import StoreSnapshot

Mode = Literal["ambient", "sidecar", "none"]

DATAPLANE_LABEL = "istio.io/dataplane-mode"
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
FINISHED_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Desired:
    pod: Pod
    mode: Mode
    reason: str


def _reason(pod: Pod, namespace: Namespace | None, mode: Mode) -> str:
    if mode == "sidecar":
        return "sidecar injected"
    pod_label = pod.labels.get(DATAPLANE_LABEL)
    if mode == "ambient":
        return "pod label" if pod_label == "ambient" else "namespace label"
    if membership.interception_none(pod.annotations):
        return "sidecar interceptionMode NONE: no redirection"
    return "pod opted out" if pod_label == "none" else "not labelled"


def pod_mode(
    pod: Pod,
    namespace: Namespace | None,
    exclude_namespaces: tuple[str, ...],
) -> tuple[Mode, str]:
    """The mode of one pod plus a short human reason."""
    if pod.host_network:
        return "none", "host network"
    if pod.namespace in exclude_namespaces:
        return "none", "excluded namespace"
    if pod.phase in FINISHED_PHASES:
        return "none", f"pod {pod.phase.lower()}"
    mode = membership.pod_mode(
        pod.namespace, pod.labels, pod.annotations, pod.host_network,
        namespace.labels if namespace is not None else None, exclude_namespaces,
    )
    return mode, _reason(pod, namespace, mode)


def desired_pods(snapshot: StoreSnapshot, exclude_namespaces: tuple[str, ...]) -> dict[str, Desired]:
    """Every pod of the snapshot with its decided mode, keyed by uid."""
    out: dict[str, Desired] = {}
    for uid, pod in snapshot.pods.items():
        mode, reason = pod_mode(pod, snapshot.namespaces.get(pod.namespace), exclude_namespaces)
        out[uid] = Desired(pod, mode, reason)
    return out


def ambient_uids(desired: Mapping[str, Desired]) -> set[str]:
    return {uid for uid, d in desired.items() if d.mode == "ambient"}
