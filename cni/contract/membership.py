"""Which dataplane mode a pod is in: "sidecar", "ambient" or "none". Pure; shared with the agent.

Order of the rules:
1. excluded namespaces (``kube-system`` by default) and hostNetwork pods -> "none";
2. annotation ``sidecar.istio.io/status`` present (an injected pod) -> "sidecar", unless
   ``sidecar.istio.io/interceptionMode`` is ``NONE`` (Istio's "no interception": the pod starts and passes
   through, as istio-iptables installs nothing for it) -> "none";
3. pod label ``istio.io/dataplane-mode``: "ambient" -> "ambient", "none" (opt-out) -> "none";
4. namespace label ``istio.io/dataplane-mode=ambient`` -> "ambient";
5. otherwise -> "none".
"""

from __future__ import annotations

from cni.contract.constants import INTERCEPTION_NONE

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)

if TYPE_CHECKING:  # no `typing`/`collections` at run time: the CNI plugin imports this module
    from collections.abc import Iterable, Mapping
    from typing import Literal

    Mode = Literal["sidecar", "ambient", "none"]

SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
INTERCEPTION_MODE_ANNOTATION = "sidecar.istio.io/interceptionMode"
DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
AMBIENT = "ambient"
OPT_OUT = "none"
DEFAULT_EXCLUDED_NAMESPACES: tuple[str, ...] = ("kube-system",)


def namespace_needed(
    namespace: str,
    pod_labels: Mapping[str, str],
    pod_annotations: Mapping[str, str],
    host_network: bool,
    exclude_namespaces: Iterable[str] = DEFAULT_EXCLUDED_NAMESPACES,
) -> bool:
    """Whether the namespace's labels can change the answer (so a caller can skip fetching them)."""
    if namespace in set(exclude_namespaces) or host_network:
        return False
    if SIDECAR_STATUS_ANNOTATION in pod_annotations:
        return False
    return pod_labels.get(DATAPLANE_MODE_LABEL) not in (AMBIENT, OPT_OUT)


def pod_mode(
    namespace: str,
    pod_labels: Mapping[str, str],
    pod_annotations: Mapping[str, str],
    host_network: bool,
    namespace_labels: Mapping[str, str] | None,
    exclude_namespaces: Iterable[str] = DEFAULT_EXCLUDED_NAMESPACES,
) -> Mode:
    """The pod's mode. ``namespace_labels`` may be None when ``namespace_needed`` said False."""
    if namespace in set(exclude_namespaces) or host_network:
        return "none"
    if SIDECAR_STATUS_ANNOTATION in pod_annotations:
        return "none" if interception_none(pod_annotations) else "sidecar"
    pod_label = pod_labels.get(DATAPLANE_MODE_LABEL)
    if pod_label == AMBIENT:
        return "ambient"
    if pod_label == OPT_OUT:
        return "none"
    if namespace_labels is not None and namespace_labels.get(DATAPLANE_MODE_LABEL) == AMBIENT:
        return "ambient"
    return "none"


def interception_none(pod_annotations: Mapping[str, str]) -> bool:
    """An injected pod that asked for no interception at all (``sidecar.istio.io/interceptionMode: NONE``)."""
    return pod_annotations.get(INTERCEPTION_MODE_ANNOTATION) == INTERCEPTION_NONE
