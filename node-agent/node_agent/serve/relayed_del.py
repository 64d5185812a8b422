"""The agent's part of a relayed CNI DEL (`cni.plugin.relayed`): what the plugin's own DEL would do
(`cni.plugin.entry.cmd_del`), decided from what the agent holds and its pod cache, so a pod that leaves
the node costs the runtime one round trip instead of an interpreter start-up.

- a pod the agent holds (ambient, or a sidecar pod it redirected or took over): let go and its
  redirection removed (`cni_del`, as the plugin's DEL event does). A sidecar pod's rules written like the
  plugin writes them come out here ("rules-removed"); when they did not (held on another backend), and
  its netns is still there, the plugin's own DEL runs (`Declined`) to remove them;
- a pod it does not hold: the plugin's `membership` decision over its pod cache (looked up on a miss, as
  the one-request ADD does). None: nothing to do. Ambient, or sidecar on an eBPF node: the agent is told,
  as the plugin tells it (pinned state of an unknown pod removed). A sidecar pod whose rules the plugin
  may have written itself (the agent was down at its ADD), with its netns still there, or a pod the agent
  cannot find (its object deleted first, another uid): `Declined`, and the plugin's own DEL runs as when
  nothing was relayed.

The agent's removal of a pod waits for every other one (a node draining many ambient pods removes them one
after the other): before it the relay sends `wait`, and the launcher waits up to `agent_timeout` as the
plugin waits for its DEL event's answer. A DEL succeeds whatever the agent's removal did, as the plugin's
does (a failed removal is retried by the agent and logged as a warning in the plugin's log). Counted in
`headrace_agent_plugin_dels_total{outcome}`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Protocol

from cni.contract import membership
from cni.contract.events import RULES_REMOVED
from cni.plugin.cni_env import CniEnv
from cni.plugin.decide import plugin_redirects
from cni.plugin.entry import netns_for_del
from cni.plugin.log import JsonLog
from cni.plugin.netconf import NetConf
from cni.plugin.relayed import Declined
from cni.plugin.via_agent import rules_setting
from node_agent.reconcile.state import SIDECAR, Mode, Outcome
from node_agent.reconcile.table import PodTable
from node_agent.serve import pod_cache
from node_agent.serve.metrics import OutcomeCounts
from node_agent.sources.store import PodStore

log = logging.getLogger("headrace.agent.cni")


class DelHandler(Protocol):
    def cni_del(self, uid: str, plugin_removes: tuple[str, str] | None = None) -> Outcome: ...


class RelayedDel:
    def __init__(self, store: PodStore, handler: DelHandler, table: PodTable, *,
                 lookup: pod_cache.Lookup | None = None) -> None:
        self.store = store
        self.handler = handler
        self.table = table
        self.lookup = lookup  # the pod and its namespace when the cache does not have them
        self.outcomes = OutcomeCounts()

    def counts(self) -> dict[str, int]:
        """DELs by outcome (and cache-miss lookups), for the metrics."""
        return self.outcomes.snapshot()

    def _held(self, uid: str) -> Mode | None:
        self.table.wait_hold(uid)  # an ADD answered just before: held once its bookkeeping is done
        with self.table.lock:
            st = self.table.get(uid)
            return st.mode if st is not None else None

    def __call__(self, env: CniEnv, conf: NetConf, plog: JsonLog, hold: Callable[[], None] = lambda: None) -> None:
        """`hold`: called before the agent's removal, which may wait for others (the relay then tells the
        launcher to wait up to `agent_timeout`, as the plugin's DEL event would)."""
        try:
            self._delete(env, conf, plog, hold)
        except Declined:  # logged by the relay
            self.outcomes.add("standalone")
            raise

    def _mode(self, env: CniEnv, conf: NetConf) -> tuple[str, Mode | None, membership.Mode]:
        """(the pod's uid, the mode the agent holds it in, the pod's mode)."""
        k8s = env.k8s
        snap = self.store.snapshot()
        uid = k8s.uid
        if not uid:  # a runtime that passes no K8S_POD_UID: the cached pod of that name, if any
            pod, _ = pod_cache.cached(snap, "", k8s.namespace, k8s.name)
            uid = pod.uid if pod is not None and pod_cache.matches(pod, "", k8s.namespace, k8s.name) else ""
        held = self._held(uid) if uid else None
        if held is not None:
            return uid, held, held
        try:
            pod, ns = pod_cache.find(snap, self.lookup, k8s.uid, k8s.namespace, k8s.name, conf.exclude_namespaces,
                                     lambda: self.outcomes.add("lookup"))
        except Exception as exc:  # the lookup's source failed: the plugin asks its own
            raise Declined(f"pod lookup failed: {exc}") from exc
        if pod is None:
            raise Declined("pod not in the agent's pod source")
        if ns is None and membership.namespace_needed(pod.namespace, pod.labels, pod.annotations,
                                                      pod.host_network, conf.exclude_namespaces):
            raise Declined(f"namespace {pod.namespace} not in the agent's pod source")
        return uid or pod.uid, None, membership.pod_mode(
            pod.namespace, pod.labels, pod.annotations, pod.host_network, ns.labels if ns is not None else None,
            conf.exclude_namespaces)

    def _delete(self, env: CniEnv, conf: NetConf, plog: JsonLog, hold: Callable[[], None]) -> None:
        uid, held, mode = self._mode(env, conf)
        source = "held by the agent" if held else "the agent's pod cache"
        plog.info("membership", f"mode {mode}: {source}", mode=mode)
        if mode == "none":
            self.outcomes.add("none")
            return
        netns_there = functools.cache(lambda: netns_for_del(env.netns, plog))
        removes = (rules_setting(conf), conf.iptables) if plugin_redirects(mode, conf) else None
        if removes is not None and held != SIDECAR and netns_there():
            raise Declined("the sidecar pod's rules may be the plugin's own: it removes them")
        hold()
        outcome = self.handler.cni_del(uid, removes)
        log.info("relayed DEL answered: %s", outcome.state if outcome.ok else outcome.error, extra={
            "pod": env.k8s.name, "namespace": env.k8s.namespace, "uid": uid, "netns": env.netns,
            "step": "cni-del-relayed", "ok": outcome.ok})
        removed = outcome.ok and outcome.state == RULES_REMOVED
        if removes is not None and not removed and netns_there():
            raise Declined("the agent did not remove the sidecar pod's rules (held on another backend): "
                           "the plugin removes them")
        if not outcome.ok:  # the plugin's DEL succeeds anyway: the agent retries the pod's removal
            plog.warning("agent", f"DEL not completed by the agent: {outcome.error}")
        elif removed:
            plog.info("redirect", "redirect removed by the agent")
        else:
            plog.info("agent", f"agent answered {outcome.state or 'ok'}", state=outcome.state)
        self.outcomes.add(mode)
