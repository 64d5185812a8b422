"""`auto` on a node where the eBPF programs are not compiled yet (its first start with them, or the first
after an upgrade that changed them): the agent serves at once and the compile runs in the background.

A simulated node, the agent with `--backend auto` and an empty object cache, the reference proxy as a real
process in its own cgroup:
- ambient pods added while the programs compile are enrolled on the iptables fallback (status says so) and
  their traffic passes the proxy;
- the compile ends under a client connecting in a tight loop: the pods move to eBPF in place, every
  connection is answered and passes the proxy (also those whose source port conntrack changed: their
  reply tuple met a REDIRECTed connection's lingering entry), and a pod added now goes to eBPF;
- the agent restarted with the cache emptied again (new programs to compile), then with programs that do
  not compile: the pod it holds on eBPF stays there as it is (same programs, nothing removed and
  re-applied), a pod added meanwhile goes to the fallback (and to eBPF once the programs compiled).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from node_agent.backends.ebpf import loader
from node_agent.lab.simnode import Pod, SimNode
from node_agent.serve.status_client import state_text

from tests.kernel.agent_kit import wait_for
from tests.kernel.test_backend_parity import (
    PORT,
    ParityRun,
    ebpf_ids,
    ebpf_state,
    inbound_only_rules,
    iptables_state,
    proxied,
    request,
    start_app,
)
from tests.kernel.test_backend_parity import ebpf_env as ebpf_env  # node + agent (ParityRun)

pytestmark = pytest.mark.kernel

AMBIENT = {"istio.io/dataplane-mode": "ambient"}

# In the client pod's netns and cgroup: connect, send, read the reply, until the stop file appears; then
# one JSON line with the count of answered connections and the failures.
LOOP = r"""
import json, os, socket, sys, time
cgroup, host, port, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
ok, failed = 0, []
while not os.path.exists(stop):
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            s.sendall(b"loop")
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        if reply == b"server|loop":
            ok += 1
        else:
            failed.append(f"{time.time():.3f} {reply!r}")
    except OSError as e:
        failed.append(f"{time.time():.3f} {e}")
print(json.dumps({"ok": ok, "failed": failed[:20], "failures": len(failed)}))
"""


def backends(agent: ParityRun, *pods: Pod) -> list[str]:
    rows = agent.status()
    return [rows.get(p.uid, {}).get("backend", "") for p in pods]


def on_ebpf(agent: ParityRun, *pods: Pod) -> bool:
    return backends(agent, *pods) == ["ebpf"] * len(pods) and all(agent.pod_state(p.uid) == "enrolled" for p in pods)


def start_without_cache(agent: ParityRun, node: SimNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent with an empty object cache (its own, under the state dir): the programs compile anew."""
    monkeypatch.delenv("HEADRACE_BPF_CACHE_DIR", raising=False)
    shutil.rmtree(node.state_dir / "bpf-cache", ignore_errors=True)
    agent.start_agent()


@contextlib.contextmanager
def looping(client: Pod, server: Pod, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """LOOP from client to server while the block runs; its result then fills the dict yielded."""
    stop = tmp_path / "stop-loop"
    proc = subprocess.Popen(
        ["nsenter", f"--net={client.netns.path}", sys.executable, "-c", LOOP, str(client.cgroup), server.ipv4,
         str(PORT), str(stop)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    result: dict[str, Any] = {}
    try:
        yield result
    finally:
        stop.touch()
        out, _ = proc.communicate(timeout=30)
    result.update(json.loads(out.strip().splitlines()[-1]))


def shop(node: SimNode, agent: ParityRun, apps: list[subprocess.Popen[bytes]]) -> tuple[Pod, Pod]:
    """Ambient client and server pods in namespace shop (the agent running), the server's app up, and one
    request of the client's through the proxy."""
    client = node.add_pod("shop", "client")  # ADD returns once enrolled
    server = node.add_pod("shop", "server")
    start_app(server.netns.path, "server", apps)
    assert_proxied(agent, client, server)
    return client, server


def relayed(agent: ParityRun, seen: int, client: Pod, server: Pod) -> tuple[int, int]:
    """The connections from client to server the proxy relayed since its log line `seen`: (outbound, inbound).
    The proxy logs a connection once it is closed."""
    lines = [x for x in agent.proxy_lines()[seen:] if "error" not in x]
    dst = f"{server.ipv4}:{PORT}"
    out = [x for x in lines if x.get("direction") == "outbound" and x.get("workload") == f"shop/{client.name}"
           and x.get("dst") == dst]
    inn = [x for x in lines if x.get("direction") == "inbound" and x.get("workload") == f"shop/{server.name}"]
    return len(out), len(inn)


def test_the_compile_ends_under_traffic_and_held_pods_stay_put(
    ebpf_env: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    node, agent, apps = ebpf_env
    agent.extra = ["--backend", "auto", "--proxy-cgroup", str(agent.proxy_cgroup)]
    node.add_namespace("shop", AMBIENT)
    agent.start_proxy()
    start_without_cache(agent, node, monkeypatch)

    # 1. while the programs compile: the iptables fallback
    client, server = shop(node, agent, apps)
    assert backends(agent, client, server) == ["iptables", "iptables"], "the compile ended before the pods came"
    assert iptables_state(client) and not ebpf_state(client) and not inbound_only_rules(client)
    assert "being compiled" in state_text(agent.status()[client.uid])  # `headrace status` says why

    # 2. the compile ends while the client connects in a tight loop: both pods move to eBPF; a pod added
    # after it gets eBPF
    seen = len(agent.proxy_lines())
    with looping(client, server, tmp_path) as got:
        wait_for(lambda: "ebpf object ready" in agent.agent_log(), 120, "the programs compiled")
        fresh = node.add_pod("shop", "fresh")
        wait_for(lambda: on_ebpf(agent, fresh), 5, "the new pod on eBPF")  # status rows lag by up to 50 ms
        assert ebpf_state(fresh) and inbound_only_rules(fresh)
        wait_for(lambda: on_ebpf(agent, client, server), 20, "the fallback's pods moved to eBPF")
        moved = len(agent.proxy_lines())
        wait_for(lambda: len(agent.proxy_lines()) > moved + 200, 20, "connections after the move")
    assert got["failures"] == 0, got["failed"]
    assert got["ok"] > 100

    wait_for(lambda: min(relayed(agent, seen, client, server)) >= got["ok"], 10, "every connection in the log")
    assert relayed(agent, seen, client, server) == (got["ok"], got["ok"]), "connections that did not pass the proxy"
    assert ebpf_state(client) and inbound_only_rules(client) and inbound_only_rules(server)
    assert_proxied(agent, fresh, server)

    # 3. restarted with the cache emptied (an upgrade with new programs): held pods stay as they are
    ids = ebpf_ids(fresh)
    agent.kill_agent(signal.SIGKILL)
    start_without_cache(agent, node, monkeypatch)
    late = node.add_pod("shop", "late")
    wait_for(lambda: backends(agent, late) != [""], 5, "the new pod in status")  # its rows lag by up to 50 ms
    assert backends(agent, late) == ["iptables"], "the compile ended before the pod came"
    wait_for(lambda: on_ebpf(agent, fresh), 20, "the eBPF pod adopted")
    wait_for(lambda: agent.agent_log().count("ebpf object ready") == 2, 120, "the programs compiled again")
    wait_for(lambda: on_ebpf(agent, late), 20, "the fallback's pod moved to eBPF")
    assert backends(agent, fresh) == ["ebpf"] and ebpf_ids(fresh) == ids
    assert "pod moved from the" not in agent.agent_log(), "a held pod changed backend"
    for pod in (fresh, late):
        assert_proxied(agent, pod, server)

    # 4. restarted with programs that do not compile (a broken upgrade): the same, for as long as it lasts
    src = tmp_path / "bpf"
    shutil.copytree(loader.bpf_source_dir(), src)
    with (src / loader.C_FILE).open("a") as f:
        f.write("\nint hr_broken(void) { return undeclared_thing; }\n")
    monkeypatch.setenv("HEADRACE_BPF_DIR", str(src))
    assert agent.proxy is not None
    agent.proxy.kill()  # both restart; the proxy comes back after the compile failed, and acks the held pods
    agent.proxy.wait(10)
    agent.kill_agent(signal.SIGKILL)
    start_without_cache(agent, node, monkeypatch)
    wait_for(lambda: "ebpf unavailable" in agent.agent_log(), 120, "the compile failed")
    agent.start_proxy()
    wait_for(lambda: on_ebpf(agent, fresh), 20, "the eBPF pod adopted")
    broken = node.add_pod("shop", "broken")
    assert backends(agent, fresh, late, broken) == ["ebpf", "ebpf", "iptables"] and ebpf_ids(fresh) == ids
    assert "pod moved from the" not in agent.agent_log(), "a held pod changed backend"
    for pod in (fresh, broken):
        assert_proxied(agent, pod, server)


def assert_proxied(agent: ParityRun, pod: Pod, server: Pod) -> None:
    seen = len(agent.proxy_lines())
    assert request(pod, server.ipv4, pod.name.encode()) == b"server|" + pod.name.encode()
    dst = f"{server.ipv4}:{PORT}"
    wait_for(lambda: proxied(agent, f"shop/{pod.name}", "shop/server", dst, seen), 10, f"{pod.name} proxied")
