"""The agent leaving the node for good: its DaemonSet deleted (`kubectl delete -k deploy/`).

A stopping agent cannot tell an uninstall from a rolling update by itself, and the two need opposite
things: on an update the next agent adopts every pod and the node's rules as they are; on an uninstall
nothing will. So with `--owner-daemonset`, at SIGTERM the agent asks the API for its DaemonSet, as
install-cni does (`install_cni.owner.decide`: gone, being deleted, or our service account's access gone
means uninstall; present means an update; no answer keeps everything). When it goes away:

- with `--on-uninstall release`, every ambient pod is released as when its label is removed (rules out,
  node proxy told, netns pin and record gone), then its `ambient.istio.io/redirection` annotation is
  removed (best effort, while the API lets us: a later mesh must not take the pod for captured). With
  `keep` (the default) ambient pods keep their redirection: they fail closed until re-created;
- the pods that keep their rules (sidecar pods, and ambient ones with `keep`) lose their netns pin and
  record: with no agent left, a pin would keep a deleted pod's network namespace until the node reboots;
- the node-side probe SNAT, of every kind, is removed from the host (with no agent to keep its pod IPs
  current, it would SNAT kubelet probes to whatever pod gets one of those IPs next).

A 404, 401 or 403 is taken for an uninstall only when the agent saw its DaemonSet since it started
(`owner.OwnerCheck`): a misspelt name or missing RBAC must not turn every restart into one.

Sidecar pods keep their rules either way: their proxy is in the pod.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from node_agent.agent import node_rules
from node_agent.agent.config import AgentConfig
from node_agent.install_cni import owner

log = logging.getLogger("headrace.agent.uninstall")

ANNOTATIONS_WITHIN = 10.0  # seconds for the annotation removals (the pod's grace period is 30 s)


def daemonset_verdict(config: AgentConfig, timeout: float = 5.0) -> owner.Verdict:
    """GET the agent's DaemonSet with the agent's own API credentials (kubeconfig or in-cluster) and decide."""
    from kubernetes import client  # lazy: heavy import
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    from node_agent.sources.kubernetes import load_client_config

    assert config.owner_daemonset is not None
    cfg = client.Configuration()
    try:
        load_client_config(cfg, config.kubeconfig)
    except Exception as exc:  # the client's ConfigException, or a file it could not read
        return owner.Verdict(owner.UNKNOWN, f"no Kubernetes API credentials: {exc}")
    with client.ApiClient(cfg) as api:
        try:
            resp = client.AppsV1Api(api).read_namespaced_daemon_set(
                config.owner_daemonset, config.agent_namespace, _preload_content=False, _request_timeout=timeout)
            return owner.decide(resp.status, resp.read(owner.MAX_BODY))
        except ApiException as exc:
            return owner.decide(exc.status or None, None, str(exc.reason))
        except (HTTPError, OSError, ValueError) as exc:
            return owner.decide(None, None, str(exc))


def owner_check(config: AgentConfig, check: Callable[[AgentConfig], owner.Verdict] = daemonset_verdict,
                pause: float = 1.0) -> owner.OwnerCheck | None:
    """The DaemonSet question for this agent (None without --owner-daemonset); `start()` it with the agent."""
    if config.owner_daemonset is None:
        return None

    def unseen(verdict: owner.Verdict) -> None:
        log.warning("DaemonSet never seen since the start (%s): at SIGTERM only a deletionTimestamp will be "
                    "taken for an uninstall", verdict.reason, extra=_fields(config))

    return owner.OwnerCheck(lambda: check(config), pause, unseen)


def _fields(config: AgentConfig) -> dict[str, str]:
    return {"step": "uninstall", "daemonset": f"{config.agent_namespace}/{config.owner_daemonset}"}


def going_away(config: AgentConfig, check: owner.OwnerCheck | None) -> bool:
    """At SIGTERM: whether the agent leaves the node for good (False without --owner-daemonset)."""
    if check is None:
        return False
    verdict = check.final()
    fields = {**_fields(config), "reason": verdict.reason}
    if verdict.uninstall:
        log.info("DaemonSet going away: leaving the node", extra=fields)
    elif verdict.action == owner.KEEP:
        log.info("DaemonSet still present: everything left for the next agent", extra=fields)
    else:
        log.warning("cannot tell whether the DaemonSet is being deleted: everything left in place", extra=fields)
    return verdict.uninstall


def leave_node(release: Callable[[], list[tuple[str, str]]] | None,
               unmark: Callable[[str, str, bool], None] | None,
               let_go: Callable[[], int],
               clear: Callable[[], list[str]] = node_rules.clear_all) -> dict[str, object]:
    """The agent's loops stopped, its DaemonSet going away: release the ambient pods (`release` given, with
    --on-uninstall release), take their annotation off through `unmark`, `let_go` of the pods that keep
    their rules (their pins and records), clear the node's probe SNAT."""
    released = release() if release is not None else []
    kept = let_go()
    unmarked = 0
    deadline = time.monotonic() + ANNOTATIONS_WITHIN
    for namespace, name in released:
        if unmark is None or time.monotonic() > deadline:
            break
        try:
            unmark(namespace, name, False)
            unmarked += 1
        except Exception as exc:  # whatever the API said (our access gone, most likely): the rest would fail too
            log.info("redirection annotations not removed from here on: %s", exc,
                     extra={"step": "uninstall", "namespace": namespace, "pod": name})
            break
    cleared = clear()
    report: dict[str, object] = {"released": len(released), "unmarked": unmarked, "kept": kept,
                                 "node_rules_removed": cleared}
    log.info("left the node", extra={"step": "uninstall", **report})
    return report
