"""The interface every redirection backend implements, so the agent treats iptables and eBPF alike.

`PodRules` is what writes one pod's redirection (also the shape of the eBPF backend's inbound delegate);
`RedirectBackend` adds what the agent asks of a node's backend. Every backend implements all of it, with
no-ops or empty answers where a member does not apply (iptables has no cgroups and no pinned state)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from cni.contract.spec import AmbientSpec, SidecarSpec

RedirectSpec = SidecarSpec | AmbientSpec


class BackendError(Exception):
    """A backend could not apply, remove or read redirection; nothing was left half-applied."""


@dataclass(frozen=True)
class PodTarget:
    """Where to act: a pod's network namespace (always pinned and inode-checked by the caller)."""

    uid: str
    namespace: str
    name: str
    netns_path: str
    netns_inode: int = 0
    ips: tuple[str, ...] = field(default=())
    cgroup_path: str | None = None  # the pod's cgroup v2 directory, when known (eBPF)


class PodRules(Protocol):
    """Writes and reads one pod's redirection."""

    name: str

    def apply(self, target: PodTarget, spec: RedirectSpec) -> None:
        """Install redirection atomically (all or nothing). Idempotent: re-applying the same spec leaves
        exactly one set; applying a different spec replaces ours in one step. Raises BackendError."""

    def remove(self, target: PodTarget) -> None:
        """Remove everything of ours; the pod is left as before apply. Idempotent (gone netns is fine)."""

    def check(self, target: PodTarget, spec: RedirectSpec) -> list[str]:
        """Problems found (missing or altered rules/programs); an empty list means intact."""

    def installed(self, target: PodTarget) -> bool:
        """Whether anything of ours is present in the pod (adoption after an agent restart)."""


@runtime_checkable
class AppliesInNetns(Protocol):
    """A backend whose apply runs on the calling thread inside the pod netns: `first` runs there just
    before the rules go in (one netns entry for the caller's own in-netns work and the apply)."""

    def apply_after(self, target: PodTarget, spec: RedirectSpec, first: Callable[[], None] | None) -> None: ...


@runtime_checkable
class Prepares(Protocol):
    """A backend with node-wide pieces worth making before its first pod: the agent calls `prepare` once, at
    start, on a thread of its own (pods applied meanwhile make what they need themselves)."""

    def prepare(self) -> None:
        """Make them; never raises (what fails is logged, and the first apply meets it again)."""


@runtime_checkable
class InboundOnRules(Protocol):
    """A backend that keeps part of a pod's redirection on a rule-based backend (eBPF: an ambient pod's
    inbound capture and policy routing), written there as that backend writes its own."""

    def rules_inbound(self, spec: RedirectSpec) -> PodRules | None:
        """The rules backend holding this spec's inbound capture, or None."""

    def own_installed(self, target: PodTarget) -> bool:
        """`installed`, not counting what it keeps on the rules backend (those rules alone may be that
        backend's own)."""


@runtime_checkable
class DeclinesNewPodsOnly(Protocol):
    """A backend whose `fallback_reason` can concern only pods it does not hold yet (eBPF under `auto`: its
    programs being compiled, or not compiling; the pods it holds have theirs pinned): those it holds, their
    redirection in place, stay with it instead of moving to the fallback (and back)."""

    def declines_new_pods_only(self, spec: RedirectSpec) -> bool:
        """Whether `fallback_reason(spec)` leaves the pods of that spec it holds with it."""


@runtime_checkable
class StepsAside(Protocol):
    """A backend whose redirection can stay in a pod while another backend's goes in beside it, and come out
    after: a pod moved between backends has no moment without redirection (both send to the same proxy
    ports meanwhile; the first NAT a connection meets is the one it keeps)."""

    def remove_beside(self, target: PodTarget, new: PodRules) -> None:
        """`remove`, once `new` holds the pod: the policy routing stays (both backends use the same entries),
        and so do rules `new` wrote over ours (`same_kind`: the same chains). Raises BackendError."""


def same_kind(a: object, b: object) -> bool:
    """Whether two rules backends write the same rules in the same place (class and iptables flavour)."""
    return type(a) is type(b) and getattr(a, "flavour", None) == getattr(b, "flavour", None)


@runtime_checkable
class PartlyAnnounced(Protocol):
    """A backend of which a pod's state is partly in nf_tables and its policy routing (announced on the
    pod netns' NFNLGRP_NFTABLES and rtnetlink groups: eBPF's ambient inbound on a rules backend with
    `change_events`) and partly not: the agent watches the pod, polls `check_unannounced` (the rest) and
    runs `check_announced` when the netns announces a change (the full `check` when both are due)."""

    def announces_part(self, spec: RedirectSpec) -> bool:
        """Whether part of a pod with this spec announces its changes (else it is polled as a whole)."""

    def check_unannounced(self, target: PodTarget, spec: RedirectSpec) -> list[str]:
        """`check` without the part that announces its changes."""

    def check_announced(self, target: PodTarget, spec: RedirectSpec) -> list[str]:
        """`check` of the part that announces its changes only (what a change announcement can concern)."""


@runtime_checkable
class QuietPolls(Protocol):
    """A polled backend that can tell, for a whole drift pass at once, which pods would read as at their
    last look that found them intact, without reading them (something announces every change to them that
    it does not read: eBPF's change count and pin-directory events). The agent skips those pods."""

    def unchanged(self, polls: Iterable[tuple[str, RedirectSpec, bool]]) -> set[str]:
        """Of the pods due for a poll ((uid, spec, whether only `check_unannounced` is due: else `check`)),
        the uids whose read would find nothing (never a pod whose read is due for another reason)."""


class RedirectBackend(PodRules, Protocol):
    """A node's redirection backend, as the agent uses it."""

    # the backend attaches to cgroups: the pods' (the agent must pass PodTarget.cgroup_path) and the node
    # proxy's (set_proxy_cgroup)
    needs_cgroup: bool
    # everything `check` reads of a pod, but its policy routing, lives in nf_tables: a change to it is
    # announced on the pod netns' NFNLGRP_NFTABLES group, so the agent checks on change instead of polling
    change_events: bool

    def fallback_reason(self, spec: RedirectSpec) -> str | None:
        """Why this backend cannot implement spec on this node (the pod should get the fallback backend),
        or None."""

    def set_proxy_cgroup(self, path: str | Path | None) -> None:
        """The node proxy's cgroup v2 directory (None: unknown). Raises BackendError."""

    def pinned_pods(self) -> list[str]:
        """UIDs of the pods with state of ours pinned on the node outside their netns (found by uid even
        when the netns is gone)."""

    def close(self) -> None:
        """Agent shutdown: release node resources held (pods keep their redirection)."""
