"""What the reconciler knows about a pod (PodState), what it answers (Outcome, RepairResult), the state
names, and the interfaces of its collaborators (proxy hub, netns pins, conntrack guard, metrics)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from node_agent.backends.base import RedirectSpec
from node_agent.protocol.workload import WorkloadInfo

if TYPE_CHECKING:
    from cni.contract.kube_objects import Pod

ENROLLED, PENDING, FAILED, NONE = "enrolled", "pending", "failed", "none"
# shown only (status rows, metrics): a pending pod whose old backend's redirection holds it until the new
# backend's is in (a backend move)
MOVING = "moving"

Mode = Literal["ambient", "sidecar"]
AMBIENT: Mode = "ambient"  # enrolled by the agent from the pod source's labels; served by the node proxy
SIDECAR: Mode = "sidecar"  # handed over by the plugin (conflist backend ebpf); its own sidecar proxy

PeerListener = Callable[[set[int], str], None]


class Hub(Protocol):
    """The node-proxy session (node_agent.proxy.hub.ProxyHub)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def upsert(self, w: WorkloadInfo) -> Future[None]: ...
    def remove(self, uid: str) -> Future[None]: ...

    @property
    def connected(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...
    def add_peer_listener(self, listener: PeerListener) -> None: ...


class Pins(Protocol):
    def path(self, uid: str) -> Path: ...
    def inode(self, uid: str) -> int | None: ...
    def pin(self, uid: str, source: str, expected_inode: int) -> str: ...
    def verify(self, uid: str, expected_inode: int) -> str: ...
    def release(self, uid: str) -> None: ...
    def pinned(self) -> dict[str, int]: ...
    def leftovers(self) -> list[str]: ...


class Conntrack(Protocol):
    def read_loose(self, netns_path: str) -> int | None: ...
    def set_loose(self, netns_path: str, value: int) -> None: ...
    def read_loose_here(self) -> int | None: ...  # in the calling thread's netns
    def set_loose_here(self, value: int) -> None: ...


class Metrics(Protocol):
    def enrolled(self) -> None: ...
    def failed(self, reason: str) -> None: ...
    def drift_repaired(self) -> None: ...
    def reconcile_took(self, seconds: float) -> None: ...
    def pod_states(self, counts: Mapping[str, int]) -> None: ...


class NoMetrics:
    def enrolled(self) -> None: ...
    def failed(self, reason: str) -> None: ...
    def drift_repaired(self) -> None: ...
    def reconcile_took(self, seconds: float) -> None: ...
    def pod_states(self, counts: Mapping[str, int]) -> None: ...


@dataclass
class CniHint:
    """What a CNI ADD told us about a pod the pod source may not show yet."""

    uid: str
    namespace: str
    name: str
    netns: str
    ips: tuple[str, ...]
    expires: float
    shown: bool = False  # the pod source has shown the pod since: the hint no longer stands in for it

    def ips_for(self, pod: Pod) -> Pod:
        """The pod with this ADD's IPs, its sandbox's own, when it brought any: the pod object has none
        before the kubelet writes them, or still an older sandbox's."""
        return _with_ips(pod, self.ips)


def same_ips(a: Iterable[str], b: Iterable[str]) -> bool:
    """Whether two lists of IPs name the same addresses (order, repeats and spelling aside; parsed only
    when the strings differ: asked in every pass and by every waiting ADD at every wake-up)."""
    sa, sb = set(a), set(b)
    return sa == sb or _addresses(sa) == _addresses(sb)


def with_add_ips(st: PodState | None, pod: Pod) -> Pod:
    """The pod with the IPs its current sandbox's ADD gave, once it was enrolled with them in that netns:
    the pod object may still show an older sandbox's (the kubelet could not write the new ones yet)."""
    return _with_ips(pod, st.add_ips) if st is not None and st.add_inode == st.inode else pod


def _with_ips(pod: Pod, ips: tuple[str, ...]) -> Pod:
    """The pod with `ips` when there are any and they are not its own already."""
    return pod.with_ips(ips) if ips and not same_ips(ips, pod.ips) else pod


def _addresses(ips: Iterable[str]) -> set[str]:
    out = set()
    for ip in ips:
        try:
            out.add(str(ipaddress.ip_address(ip)))
        except ValueError:
            out.add(ip)
    return out


@dataclass
class PodState:
    """One pod the reconciler holds, ambient or sidecar; `spec` is what its redirection implements (the
    node's AmbientSpec, or the SidecarSpec of the pod's annotations)."""

    uid: str
    namespace: str
    name: str
    mode: Mode
    spec: RedirectSpec
    state: str = PENDING
    reason: str = ""
    netns: str = ""
    inode: int = 0
    ips: tuple[str, ...] = ()
    # the IPs a CNI ADD was answered `enrolled` with, and the netns (inode) it wired: that sandbox's own
    add_ips: tuple[str, ...] = ()
    add_inode: int = 0
    cgroup_path: str | None = None
    attempts: int = 0
    retry_at: float = 0.0
    ack: Future[None] | None = None
    ack_since: float = 0.0
    rules_in: bool = False
    service_account: str = "default"
    tcp_loose: int | None = None  # the pod's nf_conntrack_tcp_loose before we changed it
    backend: str = ""  # the backend that holds (or will hold) this pod's redirection
    leaving: str = ""  # a move: the backend whose redirection stays beside the new one's until that is in
    moving_from: str = ""  # a move that keeps the pod redirected (beside, or rewritten in place): from where
    enrolled_at: float = 0.0  # wall clock of the last transition to enrolled
    applied_at: float = float("-inf")  # table clock when its enrolment apply last succeeded
    annotations: tuple[tuple[str, str], ...] = ()  # sidecar: the traffic annotations its spec comes from
    fallback_reason: str | None = None  # why the pod is on the fallback backend (logged once per reason)
    # met without a record but annotated as redirected: a previous agent (an uninstall that kept the pods'
    # redirection took its records) may have left its redirection in the pod (`Backends.find_left`)
    annotated: bool = False


@dataclass(frozen=True)
class Outcome:
    ok: bool
    state: str
    error: str = ""
    retry: bool = True


@dataclass(frozen=True)
class RepairResult:
    """A sidecar pod's rules put in place for the boot-race monitor: the backend used, and why it failed
    (empty: applied and read back intact)."""

    backend: str
    error: str = ""


def shown_state(st: PodState) -> str:
    """The state `headrace status` and the metrics show: `moving` for a pending pod still redirected by the
    backend it is moving from, else its state."""
    return MOVING if st.state == PENDING and st.moving_from else st.state


def log_ctx(st: PodState, step: str) -> dict[str, Any]:
    return {"pod": st.name, "namespace": st.namespace, "uid": st.uid, "netns": st.netns, "step": step}
