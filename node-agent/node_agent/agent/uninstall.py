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
- the node-side probe SNAT, of every kind, is removed from the host (with no agent to keep its pod IPs
  current, it would SNAT kubelet probes to whatever pod gets one of those IPs next).

A 404, 401 or 403 is taken for an uninstall only when the agent saw its DaemonSet since it started
(`OwnerCheck`): a misspelt name or missing RBAC must not turn every restart into one.

Sidecar pods keep their rules either way: their proxy is in the pod.
"""

from __future__ import annotations

import logging
import threading
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


class OwnerCheck:
    """Is the agent's DaemonSet going away? Asked at start until it is seen present, and at SIGTERM.

    A 404, 401 or 403 at SIGTERM counts as an uninstall only when the DaemonSet was seen present since the
    start: an agent that could never read it (a wrong --owner-daemonset, RBAC missing or not yet in
    force) would otherwise take every restart for an uninstall. A `deletionTimestamp` always counts."""

    START_DELAYS: tuple[float, ...] = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # between the looks at start, until one sees it

    def __init__(self, config: AgentConfig, check: Callable[[AgentConfig], owner.Verdict] = daemonset_verdict,
                 pause: float = 1.0) -> None:
        self.config = config
        self.check = check
        self.pause = pause
        self.seen = threading.Event()
        self._stop = threading.Event()
        self.fields = {"step": "uninstall", "daemonset": f"{config.agent_namespace}/{config.owner_daemonset}"}

    def start(self) -> None:
        if self.config.owner_daemonset is not None:
            threading.Thread(target=self._look, name="owner-check", daemon=True).start()

    def _look(self) -> None:
        verdict = owner.Verdict(owner.UNKNOWN, "not asked")
        for delay in self.START_DELAYS:
            if self._stop.wait(delay):
                return
            verdict = self.check(self.config)
            if verdict.action == owner.KEEP:
                self.seen.set()
                log.debug("DaemonSet seen", extra=self.fields)
                return
        log.warning("DaemonSet never seen since the start (%s): at SIGTERM only a deletionTimestamp will be "
                    "taken for an uninstall", verdict.reason, extra=self.fields)

    def going_away(self) -> bool:
        """At SIGTERM: whether the agent leaves the node for good (False without --owner-daemonset). No clear
        answer is asked again twice, `pause` s apart."""
        self._stop.set()
        if self.config.owner_daemonset is None:
            return False
        verdict = owner.ask(lambda: self.check(self.config), pause=self.pause)
        fields = {**self.fields, "reason": verdict.reason}
        if verdict.uninstall and not (verdict.deleting or self.seen.is_set()):
            log.warning("DaemonSet not readable, and never seen since the start: not taken for an uninstall, "
                        "everything left in place", extra=fields)
            return False
        if verdict.uninstall:
            log.info("DaemonSet going away: leaving the node", extra=fields)
        elif verdict.action == owner.KEEP:
            log.info("DaemonSet still present: everything left for the next agent", extra=fields)
        else:
            log.warning("cannot tell whether the DaemonSet is being deleted: everything left in place",
                        extra=fields)
        return verdict.uninstall


def leave_node(release: Callable[[], list[tuple[str, str]]] | None,
               unmark: Callable[[str, str, bool], None] | None,
               clear: Callable[[], list[str]] = node_rules.clear_all) -> dict[str, object]:
    """The agent's loops stopped, its DaemonSet going away: release the ambient pods (`release` given, with
    --on-uninstall release), take their annotation off through `unmark`, clear the node's probe SNAT."""
    released = release() if release is not None else []
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
    report: dict[str, object] = {"released": len(released), "unmarked": unmarked, "node_rules_removed": cleared}
    log.info("left the node", extra={"step": "uninstall", **report})
    return report
