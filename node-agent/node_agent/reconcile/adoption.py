"""After a restart: take over what a previous agent left, its enrolment records and netns pins.

An ambient pod whose pin still holds the recorded netns is adopted with its rules taken as in place (they
are checked, not re-added: nothing is duplicated) and put straight back into the proxy hub's desired set
from its record, before any proxy gets a snapshot: adoption then opens the `AdoptionGate`, the hub's
signal that a snapshot now holds every pod still redirected (so the proxy keeps their listeners). One
whose pinned netns is gone (node reboot without drain) is `failed` and retried, never reported enrolled.
A sidecar pod is kept `enrolled` (the drift check reads its rules back) or, when its netns is gone, what
is left of it is cleared. A pin without a record is adopted as an ambient pod the next pass decides on."""

from __future__ import annotations

import logging
import time

from cni.contract.annotations import sidecar_spec
from cni.contract.errors import CniError
from node_agent.backends import names
from node_agent.reconcile.choice import Backends
from node_agent.reconcile.enrol import AmbientEnrolment
from node_agent.reconcile.gate import AdoptionGate
from node_agent.reconcile.pod_netns import Scan
from node_agent.reconcile.records import EnrolRecord
from node_agent.reconcile.state import ENROLLED, FAILED, SIDECAR, PodState, log_ctx
from node_agent.reconcile.table import PodTable

log = logging.getLogger("headrace.agent.reconcile")


class Adoption:
    def __init__(self, table: PodTable, backends: Backends, enrolment: AmbientEnrolment,
                 gate: AdoptionGate | None = None) -> None:
        self.table = table
        self.backends = backends
        self.enrolment = enrolment
        self.gate = gate or AdoptionGate()

    def adopt(self) -> None:
        """Take over the records and pins found on disk (lock held); the gate opens when done, whatever
        happened (a snapshot must not be held back for ever)."""
        try:
            self._adopt()
        finally:
            self.gate.open()

    def _adopt(self) -> None:
        pins = self.table.pins
        records = self.table.records.load_all()
        pinned = pins.pinned()
        scan = self.enrolment.netns.new_scan()  # taken only if a pod's cgroup is wanted and not found at once
        for uid, rec in records.items():
            if rec.mode == SIDECAR:
                self._adopt_sidecar(rec, pinned.get(uid))
            else:
                self._adopt_ambient(rec, pinned.get(uid), scan)
        for uid, ino in pinned.items():
            if uid not in self.table.pods and uid not in records:
                st = self.enrolment.new_state(uid, "", "")
                st.inode, st.netns = ino, str(pins.path(uid))
                st.reason = "adopted pin without record"
                self.table.pods[uid] = st
        for uid in pins.leftovers():
            pins.release(uid)

    def _adopt_ambient(self, rec: EnrolRecord, pinned_inode: int | None, scan: Scan) -> None:
        uid = rec.uid
        st = self.enrolment.new_state(uid, rec.namespace, rec.name)
        st.ips, st.inode, st.tcp_loose = rec.ips, rec.netns_inode, rec.tcp_loose
        st.backend, st.cgroup_path = rec.backend, rec.cgroup_path
        st.service_account, st.leaving = rec.service_account, rec.leaving or self._inbound_leaving(rec)
        st.moving_from = st.leaving  # an unfinished move: that backend's redirection holds the pod meanwhile
        if rec.add_ips:  # its sandbox's ADD's IPs: they still win over an older sandbox's in the pod object
            st.add_ips, st.add_inode = rec.add_ips, rec.netns_inode
        if pinned_inode == rec.netns_inode:
            st.netns = str(self.table.pins.path(uid))
            st.rules_in = not st.leaving  # checked before use, never re-added blindly; an unfinished move is re-applied
            st.reason = "adopted after restart"
            self.enrolment.netns.fill_cgroup(st, scan)  # recorded by an agent whose backend did not need it
            self.table.pods[uid] = st
            if st.ips:
                # back into the desired set, before any proxy gets a snapshot
                self.enrolment.send(st, self.table.clock(), follow=False)
            return
        st.inode = 0
        st.state = FAILED
        st.reason = "pinned netns gone (node reboot?)"
        self.table.records.delete(uid)
        if pinned_inode is not None:
            self.table.pins.release(uid)
        self.table.pods[uid] = st

    def _inbound_leaving(self, rec: EnrolRecord) -> str:
        """An eBPF pod whose inbound capture is on another rules backend than this node's eBPF inbound (the
        iptables flavour changed, or the host gained an iptables binary): those rules leave as a move's old
        backend does, once its redirection is in again on the node's. Else ""."""
        now = self.table.records.ebpf_inbound
        if rec.backend == names.EBPF and rec.inbound and now and rec.inbound != now:
            log.info("pod's inbound rules move from the %s to the %s backend", rec.inbound, now,
                     extra={"pod": rec.name, "namespace": rec.namespace, "uid": rec.uid, "step": "adopt"})
            return rec.inbound
        return ""

    def _adopt_sidecar(self, rec: EnrolRecord, pinned_inode: int | None) -> None:
        """A sidecar pod a previous agent redirected: kept (rules checked by the drift check, not
        re-applied), or, when its netns is gone, what is left of it cleared."""
        uid = rec.uid
        ctx = {"pod": rec.name, "namespace": rec.namespace, "uid": uid, "netns": "", "step": "adopt-sidecar"}
        try:
            spec = sidecar_spec(dict(rec.annotations))
        except CniError as exc:  # the record was valid when written; never guess a spec
            log.warning("sidecar record unusable: %s", exc, extra=ctx)
        else:
            if pinned_inode == rec.netns_inode:
                st = PodState(uid, rec.namespace, rec.name, SIDECAR, spec, state=ENROLLED,
                              reason="adopted after restart", netns=str(self.table.pins.path(uid)),
                              inode=rec.netns_inode, ips=rec.ips, cgroup_path=rec.cgroup_path, rules_in=True,
                              backend=rec.backend, enrolled_at=time.time(), annotations=rec.annotations)
                self.table.pods[uid] = st
                log.info("sidecar pod adopted", extra=log_ctx(st, "adopt-sidecar"))
                return
        self.backends.remove_unheld(uid)
        if pinned_inode is not None:
            self.table.pins.release(uid)
        self.table.records.delete(uid)
        log.info("sidecar record dropped: netns gone", extra=ctx)
