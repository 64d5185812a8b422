"""The node-proxy protocol's workload message (proto/headrace/v1/node_proxy.proto) <-> ``WorkloadInfo``.

Shared by both ends: the agent's hub (node_agent.proxy.hub) sends workloads, the reference proxy
(node_agent.refproxy) receives them. ``PROTOCOL_VERSION`` is what both put in their hello.
"""

from __future__ import annotations

from node_agent.protocol.proto_gen import node_proxy_pb2 as pb
from node_agent.protocol.workload import WorkloadInfo

PROTOCOL_VERSION = 1


def workload_to_pb(w: WorkloadInfo) -> pb.Workload:
    return pb.Workload(
        uid=w.uid,
        name=w.name,
        namespace=w.namespace,
        service_account=w.service_account,
        ips=list(w.ips),
        netns_path=w.netns_path,
        netns_inode=w.netns_inode,
        node=w.node,
    )


def workload_from_pb(m: pb.Workload) -> WorkloadInfo:
    return WorkloadInfo(
        uid=m.uid,
        name=m.name,
        namespace=m.namespace,
        service_account=m.service_account,
        ips=tuple(m.ips),
        netns_path=m.netns_path,
        netns_inode=m.netns_inode,
        node=m.node,
    )
