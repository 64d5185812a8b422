"""EbpfBackend: per-pod eBPF redirection on the pod's own cgroup v2 directory.

Outbound TCP (IPv4, IPv6, v4-mapped) and DNS in eBPF (bpf/redirect.c): connect4/6 rewrite to the proxy's
loopback port from the pod IP, sock_ops + getsockopt give the proxy SO_ORIGINAL_DST. The node's cgroup
programs (node_programs) are attached to each pod's cgroup; a pod's parameters are node-map entries under
its netns cookie (pod_index), its own maps the record of them. Inbound TCP: TC programs in the pod netns
(the port rewritten to the proxy's inbound port and back, as REDIRECT), or an inbound fallback backend
(iptables, "inbound only" spec). ambient_inbound: the rules backend that takes ambient pods' inbound even
then (its CONNMARK + policy routing return the node proxy's original-source replies), written from a rules
helper child after the lock when there is one (`inbound_part`); its changes are announced, so the agent
polls only `check_unannounced` for such pods, which reads less, or nothing (`unchanged`), while the node's
change count (`bpf_watch`) stands still. Foreign programs at our hooks and foreign TC filters or tcx
programs ahead of ours are drift, removed by the apply; programs on the pod cgroup's ancestors are
reported, never removed (`foreign_progs`, `tc_foreign`, `parent_progs`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.kernel.netns import NetnsThreadTimeout
from node_agent.backends.base import AppliesInNetns, BackendError, PodRules, PodTarget, RedirectBackend, RedirectSpec
from node_agent.backends.ebpf import (
    bpfsys,
    cgroup_programs,
    inbound_part,
    loader,
    maps,
    netns_addr,
    node_maps,
    pinning,
    pod_index,
    pod_state,
    tc,
    tc_attach,
)
from node_agent.backends.ebpf.attach import CgroupError, cgroup_id, validate_cgroup
from node_agent.backends.ebpf.bpf_watch import ChangeCount
from node_agent.backends.ebpf.intact_cache import IntactPods
from node_agent.backends.ebpf.node_programs import NodePrograms
from node_agent.backends.ebpf.parent_alerts import ALERTS
from node_agent.backends.ebpf.pin_root import PinRoot
from node_agent.backends.ebpf.pod_read import read_pod
from node_agent.backends.ebpf.pod_removal import remove_pod
from node_agent.backends.ebpf.pod_state import wants_tc
from node_agent.backends.ebpf.program_loads import PendingLoads, start_loads
from node_agent.backends.ebpf.proxy_orig_dst import ProxyOrigDst
from node_agent.backends.iptables.rules_helper import RulesHelper
from node_agent.kernel.netns_runner import run_in_netns, staying_in

log = logging.getLogger("headrace.backend.ebpf")

TC_PROGRAM, TC_HOOKS, TC_NAMES = pod_state.TC_PROGRAM, pod_state.TC_HOOKS, pod_state.TC_NAMES
COMPILING = "the eBPF programs are being compiled (first start on this node)"


class EbpfBackend(RedirectBackend):
    name = "ebpf"
    needs_cgroup = True  # the agent must pass PodTarget.cgroup_path
    change_events = False  # cgroup programs and tc filters announce nothing on nf_tables: polled

    def __init__(
        self,
        state_dir: str | Path,
        inbound_fallback: PodRules | None = None,
        proxy_cgroup: str | Path | None = None,
        toolchain_fallback: bool = False,
        ambient_inbound: PodRules | None = None,
        node_tc: bool = True,
        rules_helper: RulesHelper | None = None,
        change_count: bool = False,
        bpffs_dir: str | Path | None = None,
    ) -> None:
        """proxy_cgroup: the node proxy's cgroup v2 dir (ambient: its accepted sockets live there, so one
        node-level getsockopt program there answers SO_ORIGINAL_DST). inbound_fallback: takes inbound
        capture instead of TC. toolchain_fallback (`auto`): a failed background compile makes fallback_reason
        decline every pod (the iptables fallback takes them); else apply fails closed. node_tc: False loads
        each pod its own TC programs (as when every TC slot is taken). rules_helper: a child that writes
        ambient_inbound's part of applies (`inbound_part`). change_count: run the node's change count. bpffs_dir:
        a directory on the node's bpffs for the pins, so that they outlive the agent's container (`pin_root`)."""
        self.toolchain_fallback = toolchain_fallback
        self.state_dir = Path(state_dir)
        loader.use_cache_dir(self.state_dir / loader.CACHE_DIR)  # compiled objects kept between agent runs
        self.inbound = inbound_fallback
        self.ambient_inbound = ambient_inbound
        self.proxy_cgroup = str(proxy_cgroup) if proxy_cgroup is not None else None
        self._lock = threading.RLock()
        self.orig_dst = ProxyOrigDst(self.state_dir, self._lock)
        self.node_programs = NodePrograms()
        self.node_maps = node_maps.NodeMaps()
        self.pins = PinRoot(self.state_dir, Path(bpffs_dir) if bpffs_dir is not None else None)
        self.node_tc = node_tc
        self._closed = False  # close() ran: prepare() makes nothing any more
        self.intact = IntactPods()  # the drift poll's shortcut for pods found intact
        self.rules_helper = rules_helper
        self.changes = ChangeCount(change_count, self.state_dir)

    def _root(self) -> Path:
        try:
            return self.pins.get()
        except pinning.PinError as e:
            raise BackendError(str(e)) from e

    def _object(self) -> loader.CompiledObject:
        if loader.busy():  # first start on this node: never hold the caller (the reconciler) for seconds
            raise BackendError(f"eBPF unavailable for now: {COMPILING}; retry")
        try:
            return loader.compile_object()
        except loader.ToolchainError as e:
            raise BackendError(f"eBPF backend unavailable: {e}") from e

    def _node_maps(self, root: Path) -> dict[str, int]:
        """The maps shared by every pod of the node (made and pinned on first use; the fds stay ours)."""
        try:
            return self.node_maps.get(root, self._object)
        except OSError as e:
            raise BackendError(f"cannot create or open the node eBPF maps in {root / pinning.NODE_DIR}: {e}") from e

    def _pod_dir(self, root: Path, target: PodTarget) -> Path:
        try:
            return root / pinning.pod_dir_name(target.uid)
        except pinning.PinError as e:
            raise BackendError(str(e)) from e

    def _pinned(self, target: PodTarget) -> tuple[bool, dict[str, int] | None]:
        """Whether the pod has a pin directory, and the config pinned there (None: none)."""
        pdir = self._pod_dir(self._root(), target)
        return (True, pod_state.read_config(pdir)) if pdir.is_dir() else (False, None)

    @property
    def inbound_in_ebpf(self) -> bool:
        return self.inbound is None

    def rules_inbound(self, spec: RedirectSpec) -> PodRules | None:
        """The rules backend holding this spec's inbound capture, or None (TC eBPF)."""
        return self.inbound or (self.ambient_inbound if isinstance(spec, AmbientSpec) else None)

    def inbound_rules(self, spec: RedirectSpec) -> PodRules | None:
        """`rules_inbound`, for a spec that captures inbound at all (else None)."""
        return self.rules_inbound(spec) if maps.needs_inbound(spec) else None

    # ---- RedirectBackend -----------------------------------------------------------------------------
    def fallback_reason(self, spec: RedirectSpec) -> str | None:
        """Why this backend cannot fully implement spec on this node (the agent should then use iptables
        for the pod), or None. apply() refuses such a spec rather than redirect without SO_ORIGINAL_DST."""
        if self.toolchain_fallback and (loader.busy() or loader.failure() is not None):
            return f"eBPF is unavailable on this node: {loader.failure() or COMPILING}"
        return self._spec_reason(spec)

    def declines_new_pods_only(self, spec: RedirectSpec) -> bool:
        """DeclinesNewPodsOnly: when only the programs are missing (being compiled, or not compiling)."""
        return self.fallback_reason(spec) is not None and self._spec_reason(spec) is None

    def _spec_reason(self, spec: RedirectSpec) -> str | None:
        if (reason := maps.unsupported_reason(spec)) is not None or not isinstance(spec, AmbientSpec):
            return reason
        return None if self.proxy_cgroup is not None else (
            "ambient over eBPF needs the node proxy's cgroup v2 directory (its accepted sockets live there, so "
            "SO_ORIGINAL_DST is answered there): pass proxy_cgroup / call set_proxy_cgroup, or use backend 'iptables'")

    def apply(self, target: PodTarget, spec: RedirectSpec) -> None:
        self.apply_after(target, spec, None)

    def apply_after(self, target: PodTarget, spec: RedirectSpec, first: Callable[[], None] | None) -> None:
        """`apply`, with `first` run inside the pod netns before the inbound rules go in (AppliesInNetns).
        The calling thread stays in the pod netns for the whole apply (`staying_in`): what it does there
        (the netns cookie, TC filters, the rules backend's reads and writes, `first`) needs no hand-over to
        a pooled thread, and bpf(2) and the cgroup and pin files work from any netns."""
        reason = self.fallback_reason(spec)
        if reason is not None:
            raise BackendError(f"eBPF apply for pod {target.uid}: {reason}")
        with self._lock, contextlib.ExitStack() as inside:
            self.intact.forget(target.uid)  # what it read may be changed now: read in full next
            try:
                cg = validate_cgroup(target.cgroup_path)
                inside.enter_context(staying_in(target.netns_path))
            except (CgroupError, OSError) as e:
                raise BackendError(f"eBPF apply for pod {target.uid}: {e}") from e
            rules = self.inbound_rules(spec)
            existed, pinned = self._pinned(target)
            mode = pinned["mode"] if pinned is not None else None
            if first is not None and not isinstance(rules, AppliesInNetns):
                try:
                    run_in_netns(target.netns_path, first, timeout=10.0)
                except (OSError, NetnsThreadTimeout) as e:
                    raise BackendError(f"eBPF apply for pod {target.uid}: in {target.netns_path}: {e}") from e
            had_ebpf = self._apply_ebpf(target, spec, cg, existed, pinned)
            with self._out_on_failure(target, had_ebpf):  # a rules helper's part: waited for after the lock
                pending = inbound_part.start(rules, self.rules_helper, target, maps.inbound_only(spec), first)
            was = mode if mode is not None else (maps.MODE_SIDECAR if isinstance(spec, SidecarSpec) else None)
            ambient_in = None if was == maps.MODE_SIDECAR else self.ambient_inbound  # never held a sidecar pod
            inbound_part.remove_others(rules, (self.inbound, ambient_in), target)
        if pending is not None:  # the next pod's eBPF part went in meanwhile
            with self._out_on_failure(target, had_ebpf):
                inbound_part.finish(pending, target, maps.inbound_only(spec))

    @contextlib.contextmanager
    def _out_on_failure(self, target: PodTarget, had_ebpf: bool) -> Iterator[None]:
        """A failed rules part takes out the eBPF part the apply gave a pod that had none."""
        try:
            yield
        except Exception:
            if not had_ebpf:
                with self._lock:
                    self._remove_ebpf(target)
            raise

    def _apply_ebpf(
        self, target: PodTarget, spec: RedirectSpec, cg: Path, existed: bool, old: dict[str, int] | None
    ) -> bool:
        """existed, old: `_pinned`, read just before. Whether the pod had its eBPF part (`_out_on_failure`)."""
        try:
            families = maps.families_mask(target.ips)
        except ValueError as e:
            raise BackendError(f"eBPF apply for pod {target.uid}: {e}") from e
        pm = self._pod_maps(target, spec)  # with_netns below: the cgroup and netns are not part of the spec hash
        root = self._root()
        pdir = self._pod_dir(root, target)
        wanted = cgroup_programs.wanted_programs(spec)
        ambient = isinstance(spec, AmbientSpec)
        tc_wanted = wants_tc(spec, self.rules_inbound(spec) is None)
        if ambient and self.proxy_cgroup is not None:
            self.orig_dst.ensure(self.proxy_cgroup, root, self._object, self._node_maps(root))
        cg_id = cgroup_id(cg)
        if had := old is not None:
            if old["cgroup_id"] != cg_id:
                self._remove_ebpf(replace(target, cgroup_path=None), keep_proxy=True)  # moved: off its old cgroup
                old, existed = None, False  # its pin directory went with it
            elif not pod_state.remove_foreign(cg, pdir, wanted, target, tc_wanted) and not pod_state.problems(
                    pdir, cg, wanted, pm.generation, target.netns_path, tc_wanted):  # else a full apply
                log.info("ebpf redirect already intact", extra={"pod": target.uid, "event": "ebpf_intact"})
                return True
        # the node's pod parameters are keyed by the netns cookie (so are the TC flow keys); a sidecar with
        # IPv6 gets its inbound passthrough source on lo (as the iptables backend puts it there)
        passthrough6 = isinstance(spec, SidecarSpec) and families != maps.FAM_V4
        try:
            cookie = netns_addr.cookie_and_passthrough6(target.netns_path, passthrough6)
            ino = os.stat(target.netns_path).st_ino
        except (tc.TcError, OSError) as e:
            raise BackendError(f"eBPF apply for pod {target.uid}: {e}") from e
        obj = self._object()  # only now: a pod whose pinned programs are intact needs no object
        fds = self._node_maps(root)
        try:
            slot, new_slot = pod_index.claim(fds, cookie, cg_id, old["tc_slot"] if old else 0,
                                             tc_wanted and self.node_tc)
        except OSError as e:
            raise BackendError(f"eBPF apply for pod {target.uid}: {e}") from e
        pm = maps.with_netns(pm, cookie, ino, slot, cg_id)
        pod_fds: dict[str, int] = {}
        progs: dict[str, int] = {}
        done: list[tuple[int, int, int | None]] = []  # (new fd, attach type, replaced fd)
        olds: dict[str, int] = {}
        had_tc = existed and (pdir / TC_PROGRAM).exists()
        indexed = switched = False
        pinned: pod_index.Pinned | None = None
        tc_loads: PendingLoads | None = None
        try:
            pdir.mkdir(exist_ok=True)  # in here: a failure releases the slot just claimed
            pod_fds = node_maps.create_pod_maps(obj, pm, every=tc_wanted and not slot)
            if tc_wanted and not slot:  # the verifier runs meanwhile (the pod's own TC programs; ~2 ms)
                tc_loads = start_loads(obj, fds | pod_fds, TC_NAMES, ambient=ambient)
            progs.update(self.node_programs.open(root, obj, fds, (*wanted, *TC_NAMES) if slot else wanted,
                                                 ambient=ambient))
            pinned = pod_index.pinned(pdir) if old is not None else None  # the entries to drop after
            pod_index.add_sets(fds, pm, cookie)
            indexed = True
            had = cgroup_programs.attach_wanted(cg, pdir, wanted, progs, done, olds, fresh=not existed) or had
            pod_index.point_config(fds, pm.config, cookie)
            switched = True
            if tc_wanted:
                if tc_loads is not None:
                    pending, tc_loads = tc_loads, None
                    progs.update(pending.wait())
                hooks = {hook: progs[prog_name] for prog_name, hook in TC_HOOKS}
                tc_attach.attach(target.netns_path, hooks, slot)
            elif had_tc:
                tc_attach.detach(target.netns_path)
                for prog_name in TC_NAMES:
                    pinning.unpin(pdir / prog_name)
            for name, fd in progs.items():
                pinning.pin(fd, pdir / name)
            for name in loader.POD_MAPS:
                if name in pod_fds:
                    pinning.pin(pod_fds[name], pdir / name)
                elif existed:  # a set left empty: its older pin goes
                    pinning.unpin(pdir / name)
        except (bpfsys.BpfSysError, CgroupError, OSError, tc.TcError) as e:
            cgroup_programs.rollback(cg, done)
            if tc_wanted and not had_tc:
                tc_attach.detach_quietly(target.netns_path)
            pod_index.undo(fds, pinned, cookie, pm, indexed=indexed, switched=switched)
            if new_slot:
                pod_index.release_slot(fds, slot, cookie)
            detail = f"; verifier log:\n{e.log[-2000:]}" if isinstance(e, bpfsys.BpfSysError) and e.log else ""
            raise BackendError(f"eBPF apply for pod {target.uid} failed: {e}{detail}") from e
        finally:
            if tc_loads is not None:  # the apply failed before it took them: wait for them before the maps close
                tc_loads.discard()
            for fds_of in (pod_fds, progs, olds):
                node_maps.close_all(fds_of)
        pod_index.drop_stale(fds, pinned, cookie, pm, target.uid)
        log.info(
            "ebpf redirect applied",
            extra={"pod": target.uid, "event": "ebpf_applied", "cgroup": str(cg), "programs": list(wanted)},
        )
        return had

    def _pod_maps(self, target: PodTarget, spec: RedirectSpec) -> maps.PodMaps:
        try:
            return maps.spec_maps(spec, self.rules_inbound(spec) is None, tuple(target.ips))
        except ValueError as e:
            raise BackendError(f"eBPF apply for pod {target.uid}: invalid spec: {e}") from e

    def set_proxy_cgroup(self, path: str | Path | None) -> None:
        """Where the node proxy runs (the agent learns it from the proxy's connection: proxy.cgroup_follow).
        Moves the node-level getsockopt program there when ambient pods exist."""
        with self._lock:
            new = str(path) if path is not None else None
            if new == self.proxy_cgroup:
                return
            if new is not None:
                try:
                    validate_cgroup(new)
                except CgroupError as e:
                    raise BackendError(f"proxy cgroup: {e}") from e
            root, old, self.proxy_cgroup = self._root(), self.proxy_cgroup, new
            self.orig_dst.move(old, new, root, self._object, lambda: self._node_maps(root))

    def _remove_ebpf(self, target: PodTarget, keep_proxy: bool = False) -> None:
        self.intact.forget(target.uid)
        root = self._root()
        remove_pod(root, self._pod_dir(root, target), target, self.orig_dst, self.proxy_cgroup, keep_proxy)

    def pinned_pods(self) -> list[str]:
        """UIDs of the pods with eBPF state pinned on this node (for the agent's garbage collection)."""
        return self.pins.pod_dirs()

    def prepare(self) -> None:
        """Make the bpffs mount, the node maps and both pod modes' node programs ahead of the first pod (else
        ~50 ms and the verifier under the lock: a wave waits); proxy cgroup programs left with no pod (an agent
        killed before detaching them) come off. Waits for a background compile; a failure is logged."""
        if self.rules_helper is not None:
            self.rules_helper.start()
        try:
            obj = loader.compile_object()
            with self._lock:
                if self._closed:
                    return
                root = self._root()
                fds = self._node_maps(root)
                for spec in (SidecarSpec(), AmbientSpec(capture_dns=True)):
                    tc_too = self.node_tc and wants_tc(spec, self.rules_inbound(spec) is None)
                    names = (*cgroup_programs.wanted_programs(spec), *(TC_NAMES if tc_too else ()))
                    ambient = isinstance(spec, AmbientSpec)
                    node_maps.close_all(self.node_programs.open(root, obj, fds, names, ambient=ambient))
                if not pinning.any_pod_dir(root) and self.orig_dst.pinned(root):  # left by an agent stopped
                    self.orig_dst.release(self.proxy_cgroup, root)  # within GRACE of its last pod leaving
        except (loader.ToolchainError, BackendError, bpfsys.BpfSysError, OSError) as e:
            log.warning("ebpf node programs not prepared", extra={"event": "ebpf_prepare_failed", "reason": str(e)})

    def close(self) -> None:
        """Agent shutdown: with nothing pinned for any pod, unpin the node maps and unmount <state-dir>/bpf
        (else pods keep their programs, re-adopted from the pins by the next agent)."""
        if self.rules_helper is not None:
            self.rules_helper.stop()
        with self._lock:
            self._closed = True
            self.intact.clear()  # the TC watch sockets (each holds a pod netns)
            self.changes.close()
            self.orig_dst.flush()
            self.node_maps.close()
            self.node_programs.close()
            try:
                self.pins.release_if_unused()
            except pinning.PinError as e:
                log.warning("ebpf bpffs unmount failed", extra={"reason": str(e)})

    def remove_beside(self, target: PodTarget, new: PodRules) -> None:
        """`remove` once `new` holds the pod (StepsAside): rules `new` wrote over and policy routing stay."""
        self.remove(target, new)

    def remove(self, target: PodTarget, beside: PodRules | None = None) -> None:
        with self._lock:
            pinned = self._pinned(target)[1]
            mode = pinned["mode"] if pinned is not None else None
            self._remove_ebpf(target)
            ALERTS.clear(target.uid)
            inbound_part.remove(self.inbound or (self.ambient_inbound if mode != maps.MODE_SIDECAR else None),
                                target, beside)  # the ambient inbound never held a pod pinned as sidecar

    def check(self, target: PodTarget, spec: RedirectSpec) -> list[str]:
        with self._lock:
            return self.check_unannounced(target, spec) + self.check_announced(target, spec)

    def check_announced(self, target: PodTarget, spec: RedirectSpec) -> list[str]:
        """The inbound rules (and an ambient pod's policy routing) on the rules backend."""
        if (rules := self.inbound_rules(spec)) is None:
            return []
        return [f"inbound ({rules.name}): {p}" for p in rules.check(target, maps.inbound_only(spec))]

    def announces_part(self, spec: RedirectSpec) -> bool:
        """An ambient pod's inbound is on the rules backend: announced when that one announces (nf_tables)."""
        return bool(getattr(self.inbound_rules(spec), "change_events", False))

    def check_unannounced(self, target: PodTarget, spec: RedirectSpec) -> list[str]:
        """The programs, pins, maps and TC filters (polled); a pod found intact is read through `intact_cache`."""
        with self._lock:
            try:
                cg = validate_cgroup(target.cgroup_path)
            except CgroupError as e:
                return [str(e)]
            root, count = self._root(), self.changes.read(self._object)  # the count before anything is read
            problems = read_pod(target, spec, cg, self._pod_dir(root, target), self.node_maps.current(root),
                                self.intact, inbound_in_ebpf=self.rules_inbound(spec) is None,
                                node_pins=[self.orig_dst.pinned_path(root)], generation=count)
            if isinstance(spec, AmbientSpec) and self.proxy_cgroup is not None:
                problems += self.orig_dst.problems(self.proxy_cgroup, root)
            return problems

    def unchanged(self, polls: Iterable[tuple[str, RedirectSpec, bool]]) -> set[str]:
        """QuietPolls: of the pods whose poll is their eBPF part alone (the unannounced part due, or no rules
        part), those that would read as at their last look (`IntactPods.unchanged`)."""
        with self._lock:
            uids = [uid for uid, spec, part in polls if part or self.inbound_rules(spec) is None]
            if (root := self.pins.mounted) is None or not uids:
                return set()
            return self.intact.unchanged(uids, self.changes.read(self._object), str(root / pinning.NODE_DIR))

    def own_installed(self, target: PodTarget) -> bool:
        """Pins or programs (a node that never ran eBPF has no bpffs: looked for, not mounted)."""
        with self._lock:
            root = self.pins.found()
            pdir = self._pod_dir(root, target) if root is not None else None
            return pod_state.installed(pdir, target.cgroup_path)

    def installed(self, target: PodTarget) -> bool:
        with self._lock:
            return self.own_installed(target) or any(b is not None and b.installed(target)
                                                     for b in (self.inbound, self.ambient_inbound))
