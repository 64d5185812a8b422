"""The one-request ADD (`cni.contract.agent_add`): the plugin hands the agent a whole CNI ADD; the agent
decides the pod's mode from its pod cache (a direct lookup on a miss) and acts:

- none: answered at once;
- sidecar, with the backend the plugin would write (iptables of the same flavour, or nftables) or on an
  eBPF node whose eBPF backend takes the pod and whose kubelet made the pod's cgroup directory: the
  rules (programs) applied here, in-process where the backend can (nftables: libnftables), into
  CNI_NETNS, then — once the reply is on its way — the pod held like a sidecar pod the plugin redirected
  itself (`PluginSidecars.hold`: pinned, recorded, drift watched); a CNI DEL of the pod meanwhile waits
  for it. The same backend and rules as the plugin's own path, so the plugin's DEL removes them even when
  this agent is gone by then (eBPF: the plugin has no path of its own; a failure fails the ADD);
- any other sidecar pod on eBPF (no cgroup directory yet, or another backend takes it), ambient: "interim"
  answered first (the pod is the agent's now: the plugin waits its full timeout and never falls back),
  then the existing handlers (`cni_sidecar_add`, `cni_add`).

Everything else is left to the plugin's standalone path (a "standalone" answer): a pod the agent does not
know or knows under another uid, a namespace it cannot see, a pod it holds already, a backend it does not
run, or a sidecar apply that failed (the plugin tries itself and reports its own error).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from cni.contract import agent_add, membership
from cni.contract.annotations import sidecar_spec
from cni.contract.errors import CniError
from cni.contract.kube_objects import Namespace, Pod
from cni.contract.spec import SidecarSpec
from node_agent.backends.base import BackendError, PodTarget, RedirectBackend
from node_agent.backends.ebpf import pod_cgroup
from node_agent.backends.iptables.backend import IptablesBackend
from node_agent.backends.plugin_rules import writes_like_plugin
from node_agent.reconcile.plugin_sidecars import PluginSidecars
from node_agent.reconcile.state import Outcome
from node_agent.reconcile.table import PodTable
from node_agent.serve import pod_cache
from node_agent.serve.add_request import Later, WarmAddRequest, at_once
from node_agent.serve.metrics import OutcomeCounts
from node_agent.serve.pod_cache import Lookup
from node_agent.serve.sidecar_apply import apply_for_add
from node_agent.sources.store import PodStore

log = logging.getLogger("headrace.agent.cni")

AGENT_REASON = "redirected by the agent at the plugin's ADD; watched by the agent"


class Handlers(Protocol):
    """What the agent already answers for pods it holds (the reconciler, through the server's view)."""

    def cni_add(self, uid: str, namespace: str, name: str, netns: str, ips: tuple[str, ...],
                timeout: float) -> Outcome: ...
    def cni_sidecar_add(self, uid: str, namespace: str, name: str, netns: str, ips: tuple[str, ...],
                        timeout: float, pod: Pod | None = None) -> Outcome: ...


class BackendSource(Protocol):
    def named(self, name: str) -> RedirectBackend | None: ...


class WarmAdd:
    def __init__(
        self,
        store: PodStore,
        handlers: Handlers,
        table: PodTable,
        backends: BackendSource,
        sidecars: PluginSidecars,
        *,
        lookup: Lookup | None = None,
        add_timeout: float = 20.0,
    ) -> None:
        self.store = store
        self.handlers = handlers
        self.table = table
        self.backends = backends
        self.sidecars = sidecars
        self.lookup = lookup
        self.add_timeout = add_timeout
        self.outcomes = OutcomeCounts()

    def counts(self) -> dict[str, int]:
        """ADDs by outcome (and cache-miss lookups), for the metrics."""
        return self.outcomes.snapshot()

    # ---- which pod -----------------------------------------------------------------------------------
    def _pod(self, req: WarmAddRequest) -> tuple[Pod | None, Namespace | None]:
        """The pod (None when the agent cannot tell) and its namespace (None when unknown and needed)."""
        return pod_cache.find(self.store.snapshot(), self.lookup, req.uid, req.namespace, req.name,
                              req.exclude_namespaces, lambda: self.outcomes.add("lookup"))

    # ---- the request ---------------------------------------------------------------------------------
    def add(self, req: WarmAddRequest, interim: Callable[[dict[str, Any]], None],
            later: Later = at_once) -> dict[str, Any]:
        """The reply; `interim` sends an early answer; `later(fn)` runs fn once the reply is sent (by default
        at once) — the bookkeeping of a sidecar pod the agent redirected goes there."""
        started = time.monotonic()
        ctx = {"pod": req.name, "namespace": req.namespace, "uid": req.uid, "netns": req.netns, "step": "cni-add-v2"}
        try:
            pod, ns = self._pod(req)
        except Exception as exc:  # the lookup's source failed: the plugin asks its own
            log.info("pod lookup failed: %s", exc, extra=ctx)
            pod, ns = None, None
        if pod is None:
            return self._standalone("pod not in the agent's pod source", ctx)
        needed = membership.namespace_needed(pod.namespace, pod.labels, pod.annotations, pod.host_network,
                                             req.exclude_namespaces)
        if needed and ns is None:
            return self._standalone(f"namespace {pod.namespace} not in the agent's pod source", ctx)
        mode = membership.pod_mode(pod.namespace, pod.labels, pod.annotations, pod.host_network,
                                   ns.labels if ns is not None else None, req.exclude_namespaces)
        ctx["uid"] = pod.uid
        if mode == "none":
            self.outcomes.add("none")
            why = "interceptionMode NONE" if membership.interception_none(pod.annotations) else "not in the mesh"
            return agent_add.none_reply(f"{why} (agent's pod cache)")
        spec: SidecarSpec | None = None
        if mode == "sidecar":
            try:
                spec = sidecar_spec(pod.annotations)
            except CniError as exc:  # refused before anything is done, with the plugin's error code
                self.outcomes.add("refused")
                return agent_add.failed_reply("sidecar", f"{exc.msg}: {exc.details}" if exc.details else exc.msg,
                                              retry=False, code=exc.code)
        cgroup = self._ebpf_cgroup(pod, spec) if spec is not None and req.backend == "ebpf" else None
        if spec is None or (req.backend == "ebpf" and cgroup is None):
            log.info("%s pod: the agent holds it, the plugin waits for the outcome", mode, extra=ctx)
            interim(agent_add.interim_reply(mode))
            return self._held(mode, pod, req, ctx)
        reply = self._sidecar(pod, spec, req, ctx, later, cgroup)
        log.info("sidecar pod: %s", reply.get("state") or reply.get("error"),
                 extra={**ctx, "duration_ms": round((time.monotonic() - started) * 1000, 2)})
        return reply

    def _standalone(self, reason: str, ctx: dict[str, Any]) -> dict[str, Any]:
        self.outcomes.add("standalone")
        log.info("ADD left to the plugin: %s", reason, extra=ctx)
        return agent_add.standalone_reply(reason)

    def _held(self, mode: str, pod: Pod, req: WarmAddRequest, ctx: dict[str, Any]) -> dict[str, Any]:
        self.outcomes.add(mode)
        if mode == "ambient":
            outcome = self.handlers.cni_add(pod.uid, pod.namespace, pod.name, req.netns, req.ips, self.add_timeout)
        else:  # the pod as looked up here: the pod source may not have it yet (a GET on a cache miss)
            outcome = self.handlers.cni_sidecar_add(pod.uid, pod.namespace, pod.name, req.netns, req.ips,
                                                    self.add_timeout, pod)
        log.info("plugin ADD answered: %s", outcome.state if outcome.ok else outcome.error,
                 extra={**ctx, "ok": outcome.ok})
        if outcome.ok:
            return agent_add.done_reply(mode, outcome.state)
        return agent_add.failed_reply(mode, outcome.error, outcome.retry, state=outcome.state)

    def _ebpf_cgroup(self, pod: Pod, spec: SidecarSpec) -> str | None:
        """The pod's cgroup directory, when an eBPF node's sidecar pod can be redirected right here: the
        eBPF backend takes the spec (else the held path picks the backend that does) and the kubelet made
        the directory (a few stats; else the held path looks for the pod's processes)."""
        backend = self.backends.named("ebpf")
        if backend is None or backend.fallback_reason(spec) is not None:
            return None
        found = pod_cgroup.find(pod.uid)
        return str(found) if found is not None else None

    def _backend(self, req: WarmAddRequest) -> RedirectBackend | None:
        """The agent's backend that writes what the plugin would: nftables, or iptables of the flavour the
        plugin's setting resolves to."""
        backend = self.backends.named(req.backend)  # the nftables one when the agent runs it
        if isinstance(backend, IptablesBackend) and not writes_like_plugin(backend, req.backend, req.iptables):
            return None
        return backend

    def _sidecar(self, pod: Pod, spec: SidecarSpec, req: WarmAddRequest, ctx: dict[str, Any],
                 later: Later, cgroup: str | None = None) -> dict[str, Any]:
        backend = self._backend(req)
        if backend is None:
            return self._standalone(f"the agent runs no {req.backend} backend like the plugin's", ctx)
        with self.table.lock:
            if pod.uid in self.table.pods:
                return self._standalone("the agent holds this pod already", ctx)
        try:
            inode = os.stat(req.netns).st_ino
        except OSError as exc:
            return self._standalone(f"netns {req.netns}: {exc.strerror}", ctx)
        target = PodTarget(pod.uid, pod.namespace, pod.name, req.netns, inode, req.ips, cgroup)
        t0 = time.monotonic()
        try:
            apply_for_add(backend, target, spec, later)  # its bookkeeping runs before `hold`
        except BackendError as exc:
            self.outcomes.add("apply_failed")
            log.warning("sidecar apply for the plugin failed: %s", exc, extra=ctx)
            return agent_add.failed_reply("sidecar", f"sidecar rules: {exc}", retry=True)
        self.outcomes.add("sidecar")
        ctx["apply_ms"] = round((time.monotonic() - t0) * 1000, 2)
        with self.table.lock:
            if pod.uid in self.table.pods:  # taken over meanwhile (it saw our rules)
                return agent_add.done_reply("sidecar", "enrolled", backend.name)
            done = self.table.hold_pending(pod.uid)  # a DEL of the pod waits for the hold

        def hold() -> None:  # after the reply: pinned, recorded, drift watched
            try:
                with self.table.lock:
                    held = pod.uid not in self.table.pods and self.sidecars.hold(
                        pod, req.netns, inode, backend, spec, req.ips, AGENT_REASON, cgroup)
                    if held and isinstance(backend, IptablesBackend):  # before its first drift check
                        backend.moved(req.netns, self.table.pods[pod.uid].netns)
            finally:
                self.table.hold_done(pod.uid, done)

        later(hold)
        return agent_add.done_reply("sidecar", "enrolled", backend.name)


def pod_lookup(kubeconfig: str | None, objects_dir: str | None, timeout: float = 2.0) -> Lookup | None:
    """A direct lookup of one pod and its namespace for cache misses, with the plugin's pod source code
    (a kubeconfig GET, or the objects directory); None when the agent has neither (in-cluster). An objects
    directory without the namespace's file means a namespace without labels, as for the plugin."""
    if not kubeconfig and not objects_dir:
        return None

    def lookup(namespace: str, name: str) -> tuple[Pod | None, Namespace | None]:
        from cni.plugin.pod_source import from_config

        source = from_config(kubeconfig, objects_dir, timeout)
        pod = source.get_pod(namespace, name)
        if pod is None:
            return None, None
        ns = source.get_namespace(namespace)
        return pod, (ns if ns is not None or source.authoritative else Namespace(namespace))

    return lookup
