"""Which pod, which mode, when the plugin decides on its own (its standalone path, every DEL and CHECK):
the pod source (objects dir or a kubeconfig GET) and `cni.contract.membership`.

Imported only when needed: an ADD that a running agent answers never loads it (nor the pod source).
"""

from __future__ import annotations

from cni.contract import errors, membership
from cni.contract.errors import CniError
from cni.contract.record import Record
from cni.plugin.pod_source import PodSourceError, from_config

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Mapping

    from cni.contract.kube_objects import Pod
    from cni.plugin.cni_env import CniEnv
    from cni.plugin.log import JsonLog
    from cni.plugin.netconf import NetConf


class Decision(Record):
    __slots__ = ("mode", "pod", "reason")
    mode: membership.Mode | None  # None: unknown (pod source failed; DEL only)
    pod: Pod | None
    reason: str

    def __init__(self, mode: membership.Mode | None, pod: Pod | None, reason: str) -> None:
        self._init(mode=mode, pod=pod, reason=reason)


def decide(env: CniEnv, conf: NetConf, log: JsonLog, for_del: bool = False) -> Decision:
    """The pod's mode (logged). On DEL nothing about the pod source is fatal: mode None means "unknown"."""
    try:
        decision = _decide(env, conf, for_del)
    except CniError as exc:
        if not for_del:
            raise
        log.warning("pod-source", f"pod metadata unavailable on DEL: {exc.msg}", details=exc.details)
        decision = Decision(None, None, exc.msg)
    log.info("membership", f"mode {decision.mode}: {decision.reason}", mode=decision.mode)
    return decision


def plugin_redirects(mode: membership.Mode | None, conf: NetConf) -> bool:
    """Sidecar pods on an iptables node: the plugin installs their rules itself (no agent)."""
    return mode == "sidecar" and conf.backend != "ebpf"


def without_pod(env: CniEnv, conf: NetConf) -> str:
    """Why the invocation is no pod's to redirect before any lookup ("" when the pod must be looked up)."""
    if not env.k8s.known:
        return "no Kubernetes pod identity in CNI_ARGS"
    if env.k8s.namespace in conf.exclude_namespaces:
        return f"namespace {env.k8s.namespace} is excluded"
    return ""


def _decide(env: CniEnv, conf: NetConf, for_del: bool) -> Decision:
    k8s = env.k8s
    if reason := without_pod(env, conf):
        return Decision("none", None, reason)
    try:
        source = from_config(conf.kubeconfig, conf.objects_dir, conf.api_timeout)
        pod = source.get_pod(k8s.namespace, k8s.name)
        if pod is None:
            if for_del:
                return Decision(None, None, "pod not found in the pod source")
            if source.authoritative:
                raise CniError(
                    errors.POD_METADATA_UNAVAILABLE,
                    f"pod {k8s.namespace}/{k8s.name} not found in the Kubernetes API",
                )
            return Decision("none", None, "no object for this pod in objects_dir")
        if k8s.uid and pod.authoritative_uid and k8s.uid != pod.uid:
            raise CniError(
                errors.POD_METADATA_UNAVAILABLE,
                f"pod {k8s.namespace}/{k8s.name} has UID {pod.uid}, the runtime says {k8s.uid}",
                "the pod object is stale or belongs to another pod",
            )
        ns_labels: Mapping[str, str] | None = None
        if membership.namespace_needed(
            pod.namespace, pod.labels, pod.annotations, pod.host_network, conf.exclude_namespaces
        ):
            ns = source.get_namespace(pod.namespace)
            if ns is None and source.authoritative:
                raise CniError(
                    errors.POD_METADATA_UNAVAILABLE, f"namespace {pod.namespace} not found in the Kubernetes API"
                )
            ns_labels = ns.labels if ns is not None else {}
    except PodSourceError as exc:
        raise CniError(errors.POD_METADATA_UNAVAILABLE, "pod metadata unavailable", str(exc)) from exc
    mode = membership.pod_mode(
        pod.namespace, pod.labels, pod.annotations, pod.host_network, ns_labels, conf.exclude_namespaces
    )
    if mode == "none" and membership.interception_none(pod.annotations):
        return Decision(mode, pod, "sidecar.istio.io/interceptionMode NONE: no redirection")
    return Decision(mode, pod, "pod source")
