"""Sidecar pods the plugin hands over (`backend: ebpf` conflists): the sidecar spec of the pod's annotations
applied with the agent's backend in CNI_NETNS. Like an ambient pod, the netns is pinned and an enrolment
record (mode sidecar, the traffic annotations) is written, so a restarted agent adopts the pod and the drift
check repairs it; never sent to the node proxy. Also the in-place repair of boot-race sidecar pods (the
monitor detects them; the reconciler is the one that writes pod rules)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable

from cni.contract.annotations import KNOWN, sidecar_spec
from cni.contract.errors import CniError
from cni.contract.kube_objects import Pod
from cni.contract.spec import SidecarSpec
from node_agent.backends.base import BackendError, PodTarget
from node_agent.netns.pin import PinError
from node_agent.reconcile.choice import Backends
from node_agent.reconcile.pod_netns import PodNetns
from node_agent.reconcile.state import (
    AMBIENT,
    ENROLLED,
    FAILED,
    PENDING,
    SIDECAR,
    Conntrack,
    Outcome,
    PodState,
    RepairResult,
    log_ctx,
)
from node_agent.reconcile.table import PodTable
from node_agent.sources.store import PodStore

log = logging.getLogger("headrace.agent.reconcile")


class SidecarPods:
    def __init__(
        self,
        table: PodTable,
        netns: PodNetns,
        backends: Backends,
        store: PodStore,
        conntrack: Conntrack,
        *,
        unenrol_ambient: Callable[[str, str], bool],
    ) -> None:
        self.table = table
        self.netns = netns
        self.backends = backends
        self.store = store
        self.conntrack = conntrack
        self._unenrol_ambient = unenrol_ambient

    def _wait_for_pod(self, uid: str, timeout: float) -> Pod | None:
        deadline = self.table.clock() + timeout
        while True:
            pod = self.store.snapshot().pods.get(uid)
            if pod is not None or self.table.clock() >= deadline:
                return pod
            time.sleep(0.1)

    def add(self, uid: str, namespace: str, name: str, netns: str, ips: tuple[str, ...],
            timeout: float, known: Pod | None = None) -> Outcome:
        """The plugin's ADD of a sidecar pod: pinned, recorded, redirected (checked first when the same
        sandbox is handed over again). known: the Pod object the caller has (the plugin-socket ADD looked
        it up already: its cache or a GET), else it is waited for in the agent's pod source."""
        pod = known if known is not None and known.uid == uid else self._wait_for_pod(uid, timeout)
        if pod is None:
            return Outcome(False, PENDING, "pod not in the agent's pod source yet", retry=True)
        try:
            spec = sidecar_spec(pod.annotations)
        except CniError as exc:
            return Outcome(False, FAILED, f"sidecar annotations: {exc}", retry=False)
        annotations = tuple(sorted((k, v) for k, v in pod.annotations.items() if k in KNOWN))
        with self.table.lock:
            try:
                ino = os.stat(netns).st_ino
            except OSError as exc:
                return Outcome(False, FAILED, f"netns {netns}: {exc.strerror}", retry=False)
            old = self.table.get(uid)
            if old is not None and old.mode == AMBIENT:
                if not self._unenrol_ambient(uid, "now a sidecar pod"):
                    return Outcome(False, FAILED, f"ambient redirection still in place: {old.reason}", retry=True)
                old = None
            if old is not None and (old.inode != ino or old.spec != spec):
                self.remove(uid)  # a new sandbox (or new annotations): start over
                old = None
            st = old or PodState(uid, namespace or pod.namespace, name or pod.name, SIDECAR, spec, inode=ino,
                                 ips=ips or pod.ips)
            st.annotations = annotations
            self.netns.fill_cgroup(st, self.netns.new_scan())
            backend = self.backends.of(st)
            self.table.save_record(st)  # before the pin, as PluginSidecars.hold does (the reason there)
            try:
                st.netns = self.netns.pin(uid, netns, ino)
                target = self.netns.target(st)
            except (PinError, OSError) as exc:
                if old is None:
                    self.table.records.delete(uid)
                return Outcome(False, FAILED, f"netns pin: {exc}", retry=True)
            try:
                problems = backend.check(target, spec) if st.rules_in else ["not applied"]
                if problems:
                    backend.apply(target, spec)
            except BackendError as exc:
                st.state, st.reason = FAILED, f"sidecar rules: {exc}"
                self.table.pods[uid] = st  # DEL or a retry clears it
                self.table.notify()
                return Outcome(False, FAILED, f"sidecar rules: {exc}", retry=True)
            st.state, st.rules_in, st.reason = ENROLLED, True, ""
            st.enrolled_at = time.time()
            self.table.pods[uid] = st
            self.table.notify()
            log.info("sidecar pod redirected", extra=log_ctx(st, "sidecar-enrolled"))
            return Outcome(True, ENROLLED)

    def remove(self, uid: str) -> bool:
        """Redirection out (while the pinned netns still proves it is this pod's; when it is gone, what may
        remain is pinned eBPF state, found by uid), pin released, record deleted. Whether the rules in the
        pod's netns were removed (False: not held, no pinned netns, or the removal failed)."""
        st = self.table.get(uid, SIDECAR)
        if st is None:
            return False
        backend = self.backends.of(st)
        removed = False
        try:
            try:
                target = self.netns.target(st)
            except PinError:
                self.backends.remove_pinned(backend, uid)
            else:
                backend.remove(target)
                removed = True
        except (BackendError, OSError) as exc:
            log.warning("sidecar removal: %s", exc, extra=log_ctx(st, "sidecar-remove"))
        self.table.forget(st, "sidecar pod removed", "sidecar-removed")
        return removed

    def repair_in_place(self, target: PodTarget, spec: SidecarSpec) -> RepairResult:
        """A boot-race sidecar pod (started before the plugin was chained; no rules, no state here): the
        rules the plugin would have written, put into its running netns (target: held and inode-checked by
        the caller). Connections opened before are protected first (conntrack, as for ambient enrolment)."""
        with self.table.lock:
            backend = self.backends.for_unheld_pod(spec, target.cgroup_path)
            try:
                with contextlib.suppress(OSError):
                    if self.conntrack.read_loose(target.netns_path):
                        self.conntrack.set_loose(target.netns_path, 0)
                backend.apply(target, spec)
                problems = backend.check(target, spec)
            except BackendError as exc:
                return RepairResult(backend.name, str(exc))
            return RepairResult(backend.name, "; ".join(problems))
