"""Live ambient pods moved from iptables to eBPF under traffic, by an agent restarted with `--backend ebpf`
(the same move as when the node proxy's cgroup becomes known).

A simulated node, the agent first with `--backend iptables`, the reference proxy as a real process in its
own cgroup; a client pod connects to a server pod in a tight loop while the agent is restarted with
`--backend ebpf`, which moves both pods in place (the iptables rules stay until eBPF's take over): not one
connection fails, leaves the client or reaches the server without passing the proxy, also while the
iptables connections' conntrack entries linger (a new connection whose reply tuple meets one gets another
source port from conntrack: the proxy finds it by its handshake; see docs/ebpf.md, "Moving a live pod").

Every other move (iptables ↔ nftables, legacy iptables → nftables and back, legacy ↔ nft iptables: the
node's flavour changed, eBPF → iptables or nftables),
under the same loop: not one connection fails or passes unproxied, the old backend leaves nothing, the
policy routing both use stays (no drift repair after the move).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from node_agent.lab.simnode import Pod

from cni.rules.tproxy_routes import AMBIENT as AMBIENT_ROUTES
from tests.kernel.agent_kit import iptables_save, run, wait_for
from tests.kernel.test_agent_first_compile import AMBIENT, assert_proxied, backends, looping, on_ebpf, relayed, shop
from tests.kernel.test_backend_parity import _ebpf_problems as ebpf_problems
from tests.kernel.test_backend_parity import ebpf_env as ebpf_env  # node + agent (ParityRun)
from tests.kernel.test_backend_parity import (
    ebpf_state,
    inbound_only_rules,
    iptables_state,
    nftables_state,
    node_env,
    ours,
)

pytestmark = pytest.mark.kernel


# the agent's arguments for each backend; iptables-legacy and iptables-nft: the iptables backend on one
# flavour (plain iptables: the flavour `auto` detects)
ARGS = {
    "iptables": ["--backend", "iptables"],
    "iptables-legacy": ["--backend", "iptables", "--iptables", "legacy"],
    "iptables-nft": ["--backend", "iptables", "--iptables", "nft"],
    "nftables": ["--backend", "nftables"],
    "ebpf": ["--backend", "ebpf"],
    "ebpf-legacy": ["--backend", "ebpf", "--iptables", "legacy"],  # ambient inbound on legacy iptables
    "ebpf-nft": ["--backend", "ebpf", "--iptables", "nft"],
}
MOVES = [
    ("iptables", "nftables"),
    ("nftables", "iptables"),
    ("iptables-legacy", "nftables"),
    ("nftables", "iptables-legacy"),
    ("ebpf", "iptables"),
    ("ebpf", "nftables"),
    ("iptables-legacy", "iptables-nft"),
    ("iptables-nft", "iptables-legacy"),
    ("ebpf-legacy", "ebpf-nft"),
]


def move_under_loop(agent: Any, client: Pod, server: Pod, tmp_path: Path, backend: str,
                    moved: Callable[[], bool]) -> None:
    """A tight connect loop from client to server while the agent is restarted with `backend` and until
    `moved`, then 200 more: not one connection fails, leaves the client or reaches the server unproxied."""
    seen = len(agent.proxy_lines())
    with looping(client, server, tmp_path) as got:
        wait_for(lambda: len(agent.proxy_lines()) > seen + 100, 20, "connections before the move")
        agent.kill_agent(signal.SIGTERM)
        agent.extra = [*ARGS[backend], "--proxy-cgroup", str(agent.proxy_cgroup)]
        agent.start_agent()
        wait_for(moved, 60, f"the pods moved to {backend}")
        now = len(agent.proxy_lines())
        wait_for(lambda: len(agent.proxy_lines()) > now + 200, 20, "connections after the move")
    assert got["ok"] > 200
    assert got["failures"] == 0, got["failed"]
    wait_for(lambda: min(relayed(agent, seen, client, server)) >= got["ok"], 10, "every connection in the log")
    outbound, inbound = relayed(agent, seen, client, server)
    assert outbound == got["ok"], f"{got['ok'] - outbound} connections left the client unproxied"
    assert inbound == got["ok"], f"{got['ok'] - inbound} connections reached the server unproxied"


def test_a_move_to_ebpf_under_traffic_leaves_no_connection_unproxied(ebpf_env: Any, tmp_path: Path) -> None:
    node, agent, apps = ebpf_env
    agent.extra = ["--backend", "iptables"]
    node.add_namespace("shop", AMBIENT)
    agent.start_proxy()
    agent.start_agent()
    client, server = shop(node, agent, apps)

    move_under_loop(agent, client, server, tmp_path, "ebpf", lambda: on_ebpf(agent, client, server))
    assert backends(agent, client, server) == ["ebpf", "ebpf"]
    assert ebpf_state(client) and inbound_only_rules(client) and inbound_only_rules(server)
    assert "moves from the iptables to the ebpf backend in place" in agent.agent_log()
    assert_proxied(agent, client, server)


@pytest.fixture(params=MOVES, ids=[f"{a}-to-{b}" for a, b in MOVES])
def move(request: pytest.FixtureRequest, make_node: Any) -> Iterator[tuple[str, str, Any]]:
    before, after = request.param
    if any(b.startswith("ebpf") for b in (before, after)) and (problems := ebpf_problems()):
        pytest.skip(f"eBPF cannot run here: {'; '.join(problems)}")
    for env in node_env(make_node, before.split("-")[0]):
        yield before, after, env


def left_by_others(pod: Pod, backend: str) -> list[str]:
    """What backends other than `backend` (a key of ARGS) have in the pod; iptables rules of another
    flavour than the one `backend` names count (an eBPF pod's are its ambient inbound's)."""
    kind, _, flavour = backend.partition("-")
    with_iptables = ("iptables", "ebpf") if flavour else ("iptables",)  # kinds whose iptables rules these are
    return [
        *(ebpf_state(pod) if kind != "ebpf" else []),
        *(r for r in iptables_state(pod)
          if kind not in with_iptables or (flavour and not r.startswith(f"{flavour}:"))),
        *(nftables_state(pod) if kind != "nftables" else []),
    ]


def ambient_routing(pod: Pod) -> list[str]:
    """The pod netns' IPv4 policy rule of the ambient original-source routing (empty: missing)."""
    out = run(
        ["nsenter", f"--net={pod.netns.path}", "ip", "-4", "rule", "list", "pref", str(AMBIENT_ROUTES.pref)],
        check=False,
    )
    return [line for line in out.stdout.splitlines() if f"lookup {AMBIENT_ROUTES.table}" in line]


def node_snat(node_netns: str) -> set[str]:
    """The kinds of node-side probe SNAT in the node netns: nftables (our node table), iptables-legacy,
    iptables-nft (our nat chain in that flavour)."""
    kinds = {f"iptables-{f}" for f in ("legacy", "nft")
             if any("HEADRACE_POSTROUTING" in iptables_save(node_netns, fam, f) for fam in (4, 6))}
    if run(["nsenter", f"--net={node_netns}", "nft", "list", "table", "inet", "headrace_node"],
           check=False).returncode == 0:
        kinds.add("nftables")
    return kinds


def test_a_move_between_backends_under_traffic_leaves_no_connection_unproxied(
    move: tuple[str, str, Any], tmp_path: Path
) -> None:
    """The new backend's redirection goes in beside the old one's, which comes out only then (keeping the
    policy routing both use): a tight connect loop meets no moment without redirection, and no connection
    fails."""
    before, after, (node, agent, apps) = move
    agent.extra = [*ARGS[before], "--proxy-cgroup", str(agent.proxy_cgroup)]
    node.add_namespace("shop", AMBIENT)
    agent.start_proxy()
    agent.start_agent()
    client, server = shop(node, agent, apps)
    name = after.split("-")[0]

    def moved() -> bool:
        return backends(agent, client, server) == [name, name] and all(
            agent.pod_state(p.uid) == "enrolled" and not left_by_others(p, after) for p in (client, server)
        )

    move_under_loop(agent, client, server, tmp_path, after, moved)
    for pod in (client, server):
        assert left_by_others(pod, after) == [], f"{pod.name}: the old backend's redirection is still there"
        assert ambient_routing(pod), f"{pod.name}: the ambient policy routing is gone"
    # the node-side probe SNAT: only the new agent's kind (the old one's chain or table cleared at its start)
    kind = "nftables" if name == "nftables" else "iptables-" + (after.partition("-")[2] or "*")

    def one_kind() -> set[str] | None:
        kinds = node_snat(node.netns.path)
        return kinds if len(kinds) == 1 else None

    (got,) = wait_for(one_kind, 10, "one kind of probe SNAT")
    assert got == kind or (kind == "iptables-*" and got.startswith("iptables-")), got
    if name == "ebpf":  # the same backend: its ambient inbound's rules moved to the other flavour
        assert all(ebpf_state(p) and inbound_only_rules(p) for p in (client, server))
    moving = (agent.base / f"agent{agent.agent_runs}.log").read_text()
    how = "inbound rules move from the" if name == "ebpf" else "the new redirection goes in beside"
    assert how in moving
    assert "drift found" not in moving  # e.g. the policy routing taken out with the old backend's rules
    assert "foreign nftables chains" not in moving  # iptables-nft's chains with only our jumps are not foreign
    assert_proxied(agent, client, server)


KILLED_MOVES = [("iptables", "nftables"), ("iptables-legacy", "iptables-nft")]


@pytest.fixture(params=KILLED_MOVES, ids=[f"{a}-to-{b}" for a, b in KILLED_MOVES])
def killed_move(request: pytest.FixtureRequest, make_node: Any) -> Iterator[tuple[str, str, Any]]:
    before, after = request.param
    for env in node_env(make_node, "iptables"):
        yield before, after, env


def test_an_agent_killed_in_the_middle_of_moves_finishes_them_after_its_restart(
    killed_move: tuple[str, str, Any],
) -> None:
    """SIGKILL while a wave of pods moves from iptables to nftables (or from legacy to nft iptables): the
    restarted agent finishes every move (the records name the backend each pod was leaving, with its
    flavour), so each pod ends with the new backend's redirection alone, its policy routing in place, and its
    traffic through the proxy."""
    before, after, (node, agent, apps) = killed_move
    agent.extra = [*ARGS[before], "--proxy-cgroup", str(agent.proxy_cgroup)]
    node.add_namespace("shop", AMBIENT)
    agent.start_proxy()
    agent.start_agent()
    client, server = shop(node, agent, apps)
    pods = [client, server, *(node.add_pod("shop", f"p{i}") for i in range(30))]

    agent.kill_agent(signal.SIGTERM)
    agent.extra = [*ARGS[after], "--proxy-cgroup", str(agent.proxy_cgroup)]
    agent.start_agent()
    log = agent.base / f"agent{agent.agent_runs}.log"
    wait_for(lambda: "goes in beside the old one" in log.read_text(), 20, "the first move")
    agent.kill_agent(signal.SIGKILL)
    records = [json.loads(p.read_text()) for p in (node.state_dir / "pods").glob("*.json")]
    # (a record names the iptables flavour: iptables-nft or iptables-legacy, whichever `auto` found)
    assert any(str(r.get("leaving")).startswith("iptables-") for r in records), "no move was under way at the kill"

    agent.start_agent()
    name = after.split("-")[0]
    wait_for(lambda: backends(agent, *pods) == [name] * len(pods)
             and all(agent.pod_state(p.uid) == "enrolled" for p in pods), 60, f"every pod on {after}")
    assert all(not json.loads(p.read_text()).get("leaving") for p in (node.state_dir / "pods").glob("*.json"))
    for pod in pods:
        assert left_by_others(pod, after) == [], f"{pod.name}: the old backend's rules are still there"
        assert ours(pod, name) and ambient_routing(pod), f"{pod.name}: its redirection is incomplete"
    assert_proxied(agent, client, server)
