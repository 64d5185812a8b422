"""Sidecar pods the plugin redirected on its own (iptables or nftables, no agent involved at ADD): once the
agent runs, it takes them over so the drift check watches and repairs them like every pod it holds.

Each pass offers the sidecar pods of the source the reconciler does not hold yet. Outside the lock (a
netns read spawns iptables-save) each is located (the /proc scan, else its IPs) and read: our sidecar
rules present (the plugin made them) → the netns is pinned and the pod held as a `sidecar` pod with the
backend whose rules they are (nftables when the node runs it, else iptables; rules taken as in place,
checked by the next drift pass, record written so a restarted agent adopts it). No rules: left to the
boot-race monitor (a pod that started before the plugin was chained), which installs them through the
reconciler and keeps reporting the pod; once its rules are in, the pod is held the same way
(`take_repaired`), so its drift is watched too. Pods not found, not redirected or whose read failed
are looked at again after a back-off (up to 30 s), a few per pass, so a node full of such pods never
stalls the reconcile loop. A pod that appears while the agent runs is first looked at after
`FIRST_LOOK_DELAY`: its CNI ADD is then under way or just done, and the agent holds a pod whose ADD it
answered (`serve/warm_add.py`); looking earlier would scan /proc (a read per process of the node) right
when the ADD is waiting, for a pod that has no netns or no rules yet. Pods already there when the agent
starts are looked at in its first passes. A pod let go of at a CNI DEL is not looked at again for
`AFTER_DEL_DELAY` (the plugin may be removing its rules: a takeover then would repair them back).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from cni.contract.annotations import KNOWN, sidecar_spec
from cni.contract.errors import CniError
from cni.contract.kube_objects import Pod
from cni.contract.spec import SidecarSpec
from node_agent.backends.base import BackendError, PodTarget, RedirectBackend
from node_agent.netns.finder import NetnsLocation
from node_agent.netns.pin import PinError
from node_agent.reconcile.choice import Backends
from node_agent.reconcile.pod_netns import PodNetns
from node_agent.reconcile.state import ENROLLED, SIDECAR, PodState, log_ctx
from node_agent.reconcile.table import PodTable
from node_agent.sources.desired import Desired

log = logging.getLogger("headrace.agent.reconcile")

PER_PASS = 8
FIRST_LOOK_DELAY = 5.0  # seconds before a pod that appeared while the agent runs is first looked at
AFTER_DEL_DELAY = 30.0  # seconds before a pod the agent let go of at a CNI DEL is looked at again
PLUGIN_REASON = "redirected by the plugin; watched by the agent"
BOOT_RACE_REASON = "boot race: sidecar rules installed in place by the agent; watched by the agent"


class PluginSidecars:
    def __init__(self, table: PodTable, netns: PodNetns, backends: Backends) -> None:
        self.table = table
        self.netns = netns
        self.backends = backends
        self._next: dict[str, tuple[float, int]] = {}  # uid -> (next look, misses)
        # boot-race pods whose rules the agent put in place: the boot-race monitor reports them (left to it)
        self.repaired_in_place: set[str] = set()
        self._known: set[str] = set()  # pods offered at least once; empty until the first offer
        self._primed = False

    def candidates(self, others: Mapping[str, Desired], now: float) -> list[Pod]:
        """Sidecar pods of the source to look at in this pass (lock held)."""
        for uid in [u for u in self._next if u not in others or u in self.table.pods]:
            del self._next[uid]
        self.repaired_in_place &= set(others)
        self._known &= set(others)
        out: list[Pod] = []
        for uid, d in others.items():
            if d.mode != "sidecar" or uid in self.table.pods or uid in self.repaired_in_place:
                continue
            if uid not in self._known:
                self._known.add(uid)
                if self._primed:  # new since the agent started: its ADD comes first
                    self._next[uid] = (now + FIRST_LOOK_DELAY, 0)
                    continue
            if self._next.get(uid, (0.0, 0))[0] > now or len(out) >= PER_PASS:
                continue
            out.append(d.pod)
        self._primed = True
        return out

    def deleted(self, uid: str, now: float) -> None:
        """A CNI DEL of the pod (lock held): not looked at again for AFTER_DEL_DELAY. Its rules may still
        be there while the plugin's DEL removes them (when the agent did not); taking the pod over then
        would repair them back."""
        self._known.add(uid)
        self._next[uid] = (now + AFTER_DEL_DELAY, 0)

    def _backoff(self, uid: str, now: float) -> None:
        misses = self._next.get(uid, (0.0, 0))[1] + 1
        self._next[uid] = (now + min(30.0, 0.5 * 2 ** min(misses, 6)), misses)

    def look(self, pods: list[Pod]) -> None:
        """Take over the pods whose netns holds our sidecar rules (called without the lock)."""
        # the plugin writes with the nftables backend when the node runs it, else with iptables
        backends = [b for b in self.backends.in_use() if b.name == "nftables"]
        iptables = self.backends.named("iptables")
        backends += [iptables] if iptables is not None else []
        if not backends:
            return
        scan = self.netns.new_scan()
        for pod in pods:
            now = self.table.clock()
            present: RedirectBackend | None = None
            try:
                loc = self.netns.find(pod.uid, pod.ips, scan)
                target = PodTarget(pod.uid, pod.namespace, pod.name, loc.path, loc.inode, pod.ips)
                present = next((b for b in backends if b.installed(target)), None)
            except (LookupError, OSError, BackendError):
                present = None
            with self.table.lock:
                if present is None or pod.uid in self.table.pods:
                    self._backoff(pod.uid, now)
                    continue
                self._take(pod, loc, present)

    def take_repaired(self, pod: Pod, target: PodTarget, backend: RedirectBackend) -> None:
        """A boot-race pod whose rules the agent just put in place (lock held; target's netns held by the
        caller): held from now on like a plugin sidecar pod, so the drift check watches and repairs it."""
        if pod.uid in self.table.pods:
            return
        loc = NetnsLocation(pod.uid, 0, target.netns_path, target.netns_inode, target.cgroup_path)
        self._take(pod, loc, backend, BOOT_RACE_REASON)

    def _take(self, pod: Pod, loc: NetnsLocation, backend: RedirectBackend, reason: str = PLUGIN_REASON) -> None:
        try:
            spec = sidecar_spec(pod.annotations)
        except CniError:
            self._backoff(pod.uid, self.table.clock())  # the plugin refused such a pod: nothing of ours
            return
        if not self.hold(pod, loc.path, loc.inode, backend, spec, pod.ips, reason, loc.cgroup_path):
            self._backoff(pod.uid, self.table.clock())

    def hold(self, pod: Pod, netns_path: str, inode: int, backend: RedirectBackend, spec: SidecarSpec,
             ips: tuple[str, ...], reason: str, cgroup_path: str | None = None) -> bool:
        """Hold a sidecar pod whose rules are in place (put there by the plugin, by the agent at the plugin's
        ADD, or by a boot-race repair): netns pinned, record written, watched by the drift check (lock held).
        False when the netns cannot be pinned."""
        st = PodState(pod.uid, pod.namespace, pod.name, SIDECAR, spec, state=ENROLLED, reason=reason,
                      inode=inode, ips=ips or pod.ips, cgroup_path=cgroup_path, rules_in=True,
                      backend=backend.name, enrolled_at=time.time(),
                      annotations=tuple(sorted((k, v) for k, v in pod.annotations.items() if k in KNOWN)))
        # the record before the pin: a restarted agent that finds a pin without a record takes it for an
        # ambient pod on its way in and, the pod not being ambient, removes our rules from its netns
        self.table.save_record(st)
        try:
            st.netns = self.netns.pin(pod.uid, netns_path, inode)
        except (PinError, OSError) as exc:
            self.table.records.delete(pod.uid)
            log.info("cannot pin a sidecar pod's netns: %s", exc, extra=log_ctx(st, "plugin-sidecar"))
            return False
        self.table.pods[pod.uid] = st
        self.table.notify()
        log.info("sidecar pod held (drift watched): %s", reason, extra=log_ctx(st, "plugin-sidecar"))
        return True
