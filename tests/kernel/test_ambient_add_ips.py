"""A new pod of an ambient namespace, before and during its ADD.

Before: the pod object shows (no IPs yet) before its sandbox is wired, and with containerd its infra
process starts after the ADD, so the agent has nothing to enrol it with: it waits for the ADD, which is
the way of every new pod, not an enrolment failure (none counted, logged or shown).

During: an ambient ADD is answered once the pod is enrolled with the IPs the chain gave it.

Where the runtime starts the infra process before the chain's ADD (as this lab's node does), the agent
finds the pod's netns through it and can look while the ADD is still wiring the pod, reading only the
addresses in place so far (the IPv4 one in, the IPv6 one not yet). The pod is then enrolled with those; the ADD brings
them all, and must not be answered before the pod is enrolled again with them: until then the pod has no
IPv6 rules (its IPv6 traffic would pass the proxy by) and the proxy does not know its IPv6 address.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from node_agent.lab.objects import pod_object, write_object
from node_agent.lab.simnode import Pod

from tests.kernel.agent_kit import run, wait_for
from tests.kernel.test_backend_parity import AMBIENT, PORT, proxied, request, start_app
from tests.kernel.test_backend_parity import backend as backend  # the (iptables, nftables, ebpf) fixture
from tests.kernel.test_backend_parity import env as env  # a node with pod cgroups and the agent on `backend`

pytestmark = pytest.mark.kernel

HALF_WIRED = "10.250.0.9"  # the one address the pod shows mid-ADD (on a veth pair of its own in the pod, removed after)


def test_a_pod_found_mid_add_is_answered_once_enrolled_with_all_its_ips(env: Any, backend: str) -> None:
    node, agent, apps = env
    node.add_namespace("shop", AMBIENT)
    agent.start_proxy()
    agent.start_agent()
    server = node.add_pod("shop", "server")
    start_app(server.netns.path, "server", apps)

    def half_wired(pod: Pod) -> None:
        ns = ["nsenter", f"--net={pod.netns.path}", "ip"]
        run([*ns, "link", "add", "half0", "type", "veth", "peer", "name", "half1"])
        run([*ns, "addr", "add", f"{HALF_WIRED}/32", "dev", "half0"])
        run([*ns, "link", "set", "half0", "up"])
        wait_for(lambda: agent.status().get(pod.uid, {}).get("state") == "enrolled", 20, "enrolled before its ADD")
        assert agent.status()[pod.uid]["ips"] == [HALF_WIRED]
        run([*ns, "link", "del", "half0"])

    client = node.add_pod("shop", "client", before_add=half_wired)  # returns when the ADD is answered
    row = agent.status()[client.uid]
    assert row["state"] == "enrolled" and set(row["ips"]) == {client.ipv4, client.ipv6}, row
    assert request(client, server.ipv6, b"six") == b"server|six"
    dst = f"[{server.ipv6}]:{PORT}"
    wait_for(lambda: proxied(agent, "shop/client", "shop/server", dst), 10, "the IPv6 connection proxied")


def test_a_new_pod_waits_for_its_add_without_an_enrolment_failure(env: Any, backend: str) -> None:
    node, agent, _apps = env
    node.add_namespace("shop", AMBIENT)
    agent.start_proxy()
    agent.start_agent()
    uid = str(uuid.uuid4())
    write_object(node.objects_dir, "pod-shop-new.json", pod_object("shop", "new", uid, [], node=node.netns.name))
    wait_for(lambda: agent.status().get(uid, {}).get("state") == "pending", 10, "the new pod seen")
    time.sleep(2.5)  # passes at least every second while a pod is pending
    row = agent.status()[uid]
    assert row["state"] == "pending" and "ADD" in row["reason"], row
    assert agent.metric("headrace_agent_enrolment_failures_total") == 0
    assert "enrol-failed" not in agent.agent_log()
