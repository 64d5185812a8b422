"""Which backend holds a pod: the node's, or its fallback (iptables on an eBPF node) when the node's
backend declines the pod's spec (fallback_reason) or, with `auto`, when the pod's cgroup is unknown; a pod
the node's backend holds, its redirection in place, stays there while the decline concerns new pods only
(`DeclinesNewPodsOnly`: the eBPF programs being compiled, or not compiling). A pod recorded with another
backend (the agent restarted with another --backend, or the choice changed) is settled without a moment
unredirected: where the new backend rewrites the old one's rules in place (`rewrites_in_place`: the iptables
fallback's pod moving to eBPF) they are left for it to replace; else the old one's redirection stays beside
the new one's until that is in (`StepsAside`; the pod's `leaving` names it), and comes out only then. A
backend that cannot step aside is removed first. Backends this node no longer uses are built on demand
(retired), only to clear what they left."""

from __future__ import annotations

import logging
from collections.abc import Callable

from cni.contract.spec import AmbientSpec
from node_agent.backends import names
from node_agent.backends.base import (
    BackendError,
    DeclinesNewPodsOnly,
    InboundOnRules,
    PodRules,
    PodTarget,
    RedirectBackend,
    RedirectSpec,
    StepsAside,
    same_kind,
)
from node_agent.reconcile.pod_netns import PodNetns
from node_agent.reconcile.state import PodState, log_ctx

log = logging.getLogger("headrace.agent.reconcile")

UNKNOWN_CGROUP = "the pod's cgroup v2 directory is unknown (no pod process found)"
# the backends whose redirection an earlier agent may have left in a pod, looked for in this order (the
# node's iptables flavour; eBPF first: its ambient inbound is on iptables or nftables)
LEFT_BY = (names.EBPF, "nftables", names.IPTABLES)


def rewrites_in_place(old: RedirectBackend, new: RedirectBackend, spec: RedirectSpec) -> bool:
    """Whether new's apply of an ambient pod replaces all that old installed, with no moment without
    redirection: new keeps the pod's inbound on a rules backend of old's kind (the iptables fallback and
    eBPF's ambient inbound: the same chains, rewritten in one restore, after eBPF's outbound programs are on;
    until then both capture outbound, to the same proxy port). Else old's part comes out first."""
    if not isinstance(spec, AmbientSpec) or not isinstance(new, InboundOnRules):
        return False
    return same_kind(new.rules_inbound(spec), old)


class Backends:
    def __init__(
        self,
        node: RedirectBackend,
        netns: PodNetns,
        *,
        fallback: RedirectBackend | None = None,
        cgroup_fallback: bool = True,
        factory: Callable[[str], RedirectBackend | None] | None = None,
    ) -> None:
        self.node = node
        # `auto` on a node where eBPF runs: pods whose cgroup is unknown get the fallback (iptables)
        self.fallback = fallback
        # True (`auto`): the fallback also takes pods whose cgroup is unknown; False (`ebpf`): only pods the
        # node backend itself declines (its fallback_reason(spec)); the others fail closed
        self.cgroup_fallback = cgroup_fallback
        # builds a backend this node no longer uses, to clear a pod recorded with it (backend switch)
        self._factory = factory
        self._retired: dict[str, RedirectBackend | None] = {}
        self._netns = netns

    def in_use(self) -> list[RedirectBackend]:
        """The node's backend and its fallback."""
        return [b for b in (self.node, self.fallback) if b is not None]

    def named(self, name: str) -> RedirectBackend | None:
        for b in self.in_use():
            if b.name == name:
                return b
        if name not in self._retired:
            made = None
            if self._factory is not None:
                try:
                    made = self._factory(name)
                except Exception as exc:
                    log.warning("cannot build backend %s: %s", name, exc, extra={"step": "backend"})
            self._retired[name] = made
        return self._retired[name]

    def _declines(self, spec: RedirectSpec, cgroup_path: str | None, cgroup_fallback: bool) -> str | None:
        """Why the node's backend should not hold such a pod, or None."""
        reason = self.node.fallback_reason(spec)
        if reason is None and cgroup_fallback and not cgroup_path and self.node.needs_cgroup:
            reason = UNKNOWN_CGROUP
        return reason

    def choose(self, st: PodState) -> RedirectBackend:
        """The backend the pod should have now."""
        if self.fallback is None:
            return self.node
        reason = self._declines(st.spec, st.cgroup_path, self.cgroup_fallback)
        if reason is None or (st.rules_in and st.backend == self.node.name and self._new_only(st.spec)):
            return self.node  # a decline for new pods moves no pod the node's backend holds
        if st.fallback_reason != reason:
            st.fallback_reason = reason
            log.info("pod uses the %s backend: %s", self.fallback.name, reason,
                     extra={**log_ctx(st, "backend"), "backend": self.fallback.name})
        return self.fallback

    def _new_only(self, spec: RedirectSpec) -> bool:
        return isinstance(self.node, DeclinesNewPodsOnly) and self.node.declines_new_pods_only(spec)

    def for_unheld_pod(self, spec: RedirectSpec, cgroup_path: str | None) -> RedirectBackend:
        """The backend for a pod the reconciler holds no state for (boot-race repair): as `choose`, and a
        pod whose cgroup is unknown goes to the fallback whatever the setting."""
        if self.fallback is not None and self._declines(spec, cgroup_path, True) is not None:
            return self.fallback
        return self.node

    def of(self, st: PodState) -> RedirectBackend:
        """The pod's backend: the one recorded, else the one chosen now (recorded in st.backend)."""
        if st.backend:
            b = self.named(st.backend)
            if b is not None:
                return b
        chosen = self.choose(st)
        st.backend = chosen.name
        return chosen

    def settle(self, st: PodState) -> None:
        """A pod recorded with another backend than the one it should have now: the new one's apply rewrites
        the old one's redirection in place, or goes in beside it (the old one then `leaving`, removed by
        `step_aside` after the apply), or, for a backend that cannot step aside, the old one's comes out
        first. Raises BackendError/PinError/OSError."""
        chosen = self.choose(st)
        if st.backend and st.backend != chosen.name:
            old = self.named(st.backend)
            kept = old is not None and bool(st.inode) and self._leave(st, old, chosen)
            st.moving_from = st.backend if kept else ""
            st.rules_in = False
        st.backend = chosen.name
        if st.leaving == chosen.name:
            st.leaving = ""  # moved back before the old one came out: it is the pod's again

    def _leave(self, st: PodState, old: RedirectBackend, chosen: RedirectBackend) -> bool:
        """The pod's move from `old` to `chosen`: rewritten in place, or `old` leaving (stepping aside after
        the apply), or, where it cannot step aside, its redirection removed now. Whether old's redirection
        holds the pod until chosen's is in."""
        ctx = log_ctx(st, "backend-switch")
        if rewrites_in_place(old, chosen, st.spec):
            log.info("pod moves from the %s to the %s backend in place", old.name, chosen.name, extra=ctx)
            return True
        target = self._netns.target(st)
        if not old.installed(target):
            return False
        if not isinstance(old, StepsAside):
            old.remove(target)
            log.info("pod moved from the %s to the %s backend", old.name, chosen.name, extra=ctx)
            return False
        if st.leaving and st.leaving != chosen.name:  # a move before this one not finished
            self.step_aside(self.leaving(st), target, old)
        st.leaving = old.name
        log.info("pod moves from the %s to the %s backend: the new redirection goes in beside the old one",
                 old.name, chosen.name, extra=ctx)
        return True

    def find_left(self, st: PodState) -> None:
        """A pod with no backend recorded that is annotated as redirected: the first backend whose own
        redirection is found in it (LEFT_BY; eBPF's inbound rules are not its rules backend's) becomes the
        pod's recorded one, so that `settle` moves it to the chosen one as after a backend switch, instead
        of leaving it there beside the new redirection for as long as the pod lives. Raises
        BackendError/OSError."""
        target = self._netns.target(st)
        for name in LEFT_BY:
            b = self.named(name)
            if b is not None and (b.own_installed(target) if isinstance(b, InboundOnRules) else b.installed(target)):
                st.backend = name
                log.info("pod still redirected by the %s backend (an earlier agent's)", name,
                         extra={**log_ctx(st, "backend"), "backend": name})
                return

    def leaving(self, st: PodState) -> RedirectBackend | None:
        """The backend whose redirection is still in the pod beside its own backend's (a move), or None."""
        return self.named(st.leaving) if st.leaving else None

    @staticmethod
    def step_aside(leaving: RedirectBackend | None, target: PodTarget, new: PodRules) -> None:
        """After `new`'s apply: the backend the pod moved from takes its redirection out (the policy routing
        and what `new` rewrote stay). Raises BackendError/OSError."""
        if isinstance(leaving, StepsAside):
            leaving.remove_beside(target, new)

    def remove_pinned(self, backend: RedirectBackend, uid: str) -> bool:
        """Remove what `backend` pinned for the pod outside its netns (the netns may be gone: found by uid).
        Whether there was something. Raises BackendError/OSError."""
        if uid not in backend.pinned_pods():
            return False
        backend.remove(PodTarget(uid, "", "", ""))
        return True

    def remove_unheld(self, uid: str) -> None:
        """A pod we hold no state for (a sidecar pod redirected by an earlier agent run) may still have
        pinned eBPF state: remove it by its pins (cgroup found by id; TC went with the netns)."""
        for b in self.in_use():
            try:
                if self.remove_pinned(b, uid):
                    log.info("pinned state of an unknown pod removed", extra={"uid": uid, "step": "cni-del"})
            except (BackendError, OSError) as exc:
                log.warning("removing pinned state: %s", exc, extra={"uid": uid, "step": "cni-del"})

    def close(self) -> None:
        """Agent shutdown: let backends release node resources they hold (pods keep their redirection)."""
        for b in (*self.in_use(), *self._retired.values()):
            if b is None:
                continue
            try:
                b.close()
            except Exception as exc:
                log.warning("backend close: %s", exc, extra={"step": "stop"})
