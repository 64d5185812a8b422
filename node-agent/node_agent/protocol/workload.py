"""A workload as the node proxy sees it (pure data, shared by the agent, the gRPC hub and the proxy)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkloadInfo:
    uid: str
    name: str
    namespace: str
    service_account: str = "default"
    ips: tuple[str, ...] = field(default=())
    netns_path: str = ""  # pinned: <state-dir>/netns/<uid>
    netns_inode: int = 0  # the proxy verifies it before entering
    node: str = ""
