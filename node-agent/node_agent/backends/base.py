"""The interface every redirection backend implements, so the agent treats iptables and eBPF alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

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


class RedirectBackend(Protocol):
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


def needs_cgroup(backend: RedirectBackend) -> bool:
    """Whether the backend acts on the pod's cgroup, so the agent must pass PodTarget.cgroup_path
    (a backend's `needs_cgroup` attribute; eBPF by name when it has none, e.g. a test double)."""
    return bool(getattr(backend, "needs_cgroup", backend.name == "ebpf"))
