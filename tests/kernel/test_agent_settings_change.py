"""Agent settings changed on a running node (the ConfigMap edited, the DaemonSet restarted): pods already
enrolled follow, on every backend, without a pod restart.

- `--capture-dns` on, then off: the pods' DNS goes to the node proxy's 15053 (a stand-in listens there,
  the reference proxy serves no DNS), then to the server asked again.
- a namespace added to `--exclude-namespaces`: its pods are unenrolled (nothing of ours left in them, their
  pin and record gone), and enrolled again when it is taken out.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest
from node_agent.lab.simnode import Pod
from node_agent.lab.traffic import udp_request, udp_responder

from tests.kernel.agent_kit import wait_for
from tests.kernel.test_agent_backend_move import ARGS
from tests.kernel.test_agent_first_compile import AMBIENT, assert_proxied, shop
from tests.kernel.test_backend_parity import _ebpf_problems as ebpf_problems
from tests.kernel.test_backend_parity import anything_of_ours, node_env

pytestmark = pytest.mark.kernel


@pytest.fixture(params=["iptables", "nftables", "ebpf"])
def any_backend(request: pytest.FixtureRequest, make_node: Any) -> Iterator[tuple[str, Any]]:
    """(backend, (node, agent, apps)): the agent not started yet, its arguments for the backend set."""
    backend = request.param
    if backend == "ebpf" and (problems := ebpf_problems()):
        pytest.skip(f"eBPF cannot run here: {'; '.join(problems)}")
    for node, agent, apps in node_env(make_node, backend):
        agent.extra = [*ARGS[backend], "--proxy-cgroup", str(agent.proxy_cgroup)]
        yield backend, (node, agent, apps)


def restart(agent: Any, extra: list[str]) -> None:
    agent.kill_agent(signal.SIGTERM)
    agent.extra = extra
    agent.start_agent()


def answered_by(client: Pod, server: Pod) -> bytes:
    """Who answers the client's DNS query (sent from the pod's cgroup: eBPF's hooks are per cgroup) to the
    server's IP: the node proxy's stand-in on the client's 127.0.0.1:15053 (captured) or the server itself
    (not); b"" when nobody does."""
    with udp_responder(client.netns.path, 15053, label=b"dns-proxy", addr="127.0.0.1"), \
            udp_responder(server.netns.path, 53, label=b"server"):
        try:
            return udp_request(client.netns.path, server.ipv4, 53, b"q", timeout=0.5, cgroup=client.cgroup)[0]
        except OSError:
            return b""


def started(any_backend: tuple[str, Any]) -> tuple[Any, Any, list[str], Pod, Pod]:
    """The agent and proxy started, ambient client and server pods enrolled: (node, agent, the agent's
    arguments, client, server)."""
    _backend, (node, agent, apps) = any_backend
    node.add_namespace("shop", AMBIENT)
    agent.start_proxy()
    agent.start_agent()
    return (node, agent, list(agent.extra), *shop(node, agent, apps))


def test_capture_dns_turned_on_and_off_reaches_running_pods(any_backend: tuple[str, Any]) -> None:
    _node, agent, args, client, server = started(any_backend)
    assert answered_by(client, server) == b"server|q"
    for extra, expected in ((["--capture-dns"], b"dns-proxy|q"), ([], b"server|q")):
        restart(agent, [*args, *extra])
        wait_for(lambda e=expected: answered_by(client, server) == e, 20, f"DNS answered {expected!r}")  # type: ignore[misc]


def test_an_excluded_namespace_is_unenrolled_and_enrolled_again(any_backend: tuple[str, Any]) -> None:
    node, agent, args, client, server = started(any_backend)
    restart(agent, [*args, "--exclude-namespaces", "kube-system,shop"])
    wait_for(lambda: not any(anything_of_ours(node, p) for p in (client, server)), 20, "the pods unenrolled")
    assert all(agent.pod_state(p.uid) in ("none", "absent") for p in (client, server))
    for pod in (client, server):
        assert not (node.state_dir / "pods" / f"{pod.uid}.json").exists(), "record left"
        assert not (node.state_dir / "netns" / pod.uid).exists(), "pin left"

    restart(agent, args)
    wait_for(lambda: all(agent.pod_state(p.uid) == "enrolled" for p in (client, server)), 20, "enrolled again")
    assert_proxied(agent, client, server)
