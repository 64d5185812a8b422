"""The agent's node duties as a real process in a node netns.

- `--install-cni` (tmp dirs, never /etc/cni/net.d or /opt/cni/bin): the entry and the launcher appear at
  start, a rewrite that drops the entry is repaired within a second while the agent runs, SIGTERM with
  `--cni-cleanup-on-exit` restores the config byte for byte and removes the plugin files.
- Node boot race on a simulated node: a sidecar pod created by a chain WITHOUT
  headrace-cni runs unredirected; the agent (iptables backend) finds its netns (harness pods are bare
  netns, found by their IPs), reports it, and with `--repair-sidecars=apply` installs the sidecar rules
  in place: the pod's outbound TCP then lands on 15001 with SO_ORIGINAL_DST; from then on it is
  drift-watched like every pod (its nat table flushed: the rules are back within 2 s). A sidecar pod the
  plugin made is left alone. With `flag` the pod is only reported and stays direct.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.netns import NetNS
from tests.harness.node import SimNode
from tests.harness.traffic import Listener, tcp_request
from tests.kernel.agent_kit import AgentRun, headrace_rules, wait_for

pytestmark = pytest.mark.kernel

DATA = Path(__file__).parent.parent / "data" / "conflists"
CONFLIST = "87-podman-bridge.conflist"
SIDECAR = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}


def has_entry(path: Path) -> bool:
    try:
        doc = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return bool(doc["plugins"][-1].get("type") == "headrace-cni")


def test_agent_install_cni_repairs_and_cleans_up_on_sigterm(tmp_path: Path) -> None:
    node = NetNS.create("hra-node-")
    conf, bin_dir, install_dir = tmp_path / "net.d", tmp_path / "bin", tmp_path / "opt-headrace"
    conf.mkdir()
    bin_dir.mkdir()
    target = conf / CONFLIST
    original = (DATA / CONFLIST).read_bytes()
    target.write_bytes(original)
    objects = tmp_path / "objects"
    objects.mkdir()
    agent = AgentRun(node.path, objects, tmp_path / "agent", extra=[
        "--install-cni", "--cni-conf-dir", str(conf), "--cni-bin-dir", str(bin_dir),
        "--cni-install-dir", str(install_dir), "--cni-cleanup-on-exit", "--repair-sidecars", "off"])
    try:
        agent.start_agent()
        wait_for(lambda: has_entry(target), 10, "entry chained")
        entry = json.loads(target.read_text())["plugins"][-1]
        assert entry["agent_socket"] == agent.cni_socket and entry["objects_dir"] == str(objects)
        assert os.access(bin_dir / "headrace-cni", os.X_OK)
        for _ in range(2):  # another CNI agent / an upgrade rewrites the file without our entry
            time.sleep(0.3)
            tmp = conf / ".rewrite.tmp"
            tmp.write_bytes(original)
            os.rename(tmp, target)
            assert not has_entry(target)
            start = time.monotonic()
            wait_for(lambda: has_entry(target), 3, "entry repaired")
            assert time.monotonic() - start < 1.0
        agent.kill_agent(signal.SIGTERM)
        assert agent.agent is not None and agent.agent.returncode == 0, agent.agent_log()[-2000:]
        assert target.read_bytes() == original
        assert sorted(p.name for p in conf.iterdir()) == [CONFLIST]
        assert list(bin_dir.iterdir()) == []
        assert not install_dir.exists() or list(install_dir.iterdir()) == []
    finally:
        agent.close()
        node.delete()


def direct_or_redirected(pod_ns: str, peer_ip: str) -> bytes:
    with Listener(pod_ns, 15001, label="out"):
        return tcp_request(pod_ns, peer_ip, 8080, b"o")


@pytest.mark.parametrize("mode", ["apply", "flag"])
def test_boot_race_sidecar_pod_found_and_repaired(make_node: Callable[..., SimNode], tmp_path: Path,
                                                   mode: str) -> None:
    node = make_node(headrace=None)  # headrace-cni not chained yet: the node is still booting
    early = node.add_pod("shop", "early", annotations=SIDECAR)
    peer = node.add_pod("plain", "peer")
    node.headrace = {}  # now the plugin is in the chain
    made = node.add_pod("shop", "made", annotations=SIDECAR)
    assert headrace_rules(early.netns.path) == [] and headrace_rules(made.netns.path) != []
    made_rules = headrace_rules(made.netns.path)
    agent = AgentRun(node.netns.path, node.objects_dir, tmp_path / "agent",
                     extra=["--repair-sidecars", mode])
    try:
        with Listener(peer.netns.path, 8080, label="peer") as peer_l:
            assert direct_or_redirected(early.netns.path, peer.ipv4) == b"peer|o"  # bypasses its sidecar
            peer_l.wait_one()
            agent.start_agent()
            want = "enrolled" if mode == "apply" else "failed"
            row = wait_for(lambda: (r := agent.status().get(early.uid, {})).get("state") == want and r, 20,
                           f"boot-race pod {want}")
            assert row["mode"] == "sidecar" and row["boot_race"] == ("repaired" if mode == "apply" else "flagged")
            assert "before headrace-cni was installed" in row["reason"]
            made_row = agent.status()[made.uid]
            # the plugin made its rules: the agent watches them (drift repair), no boot race
            made_row = wait_for(lambda: (r := agent.status()[made.uid]).get("state") == "enrolled" and r, 20,
                                "plugin sidecar pod taken over")
            assert "boot_race" not in made_row and "plugin" in made_row["reason"]
            assert headrace_rules(made.netns.path) == made_rules  # left alone
            assert agent.metric("headrace_agent_boot_race_detected_total") == 1
            assert agent.metric("headrace_agent_boot_race_repairs_total") == (1 if mode == "apply" else 0)
            state = "repaired" if mode == "apply" else "flagged"
            _, text = agent.http("/metrics")
            assert f'headrace_agent_boot_race_pods{{state="{state}"}} 1.0' in text

            if mode == "apply":
                with Listener(early.netns.path, 15001, label="out") as out:
                    assert tcp_request(early.netns.path, peer.ipv4, 8080, b"o") == b"out|o"
                    assert out.wait_one().original_dst == (peer.ipv4, 8080)
                    # the sidecar's own traffic (uid 1337) still goes straight out
                    assert tcp_request(early.netns.path, peer.ipv4, 8080, b"p", uid=1337, gid=1337) == b"peer|p"
                rules = headrace_rules(early.netns.path)
                assert rules != []
                # from now on the repaired pod is drift-watched like every pod: its nat table flushed, the
                # rules are back within 2 s (drift interval 1 s), the repair counted, traffic redirected again
                repairs = agent.metric("headrace_agent_drift_repairs_total")
                flavour = rules[0].split(":", 1)[0]
                subprocess.run(["nsenter", f"--net={early.netns.path}", f"iptables-{flavour}", "-t", "nat", "-F"],
                               check=True, capture_output=True)
                flushed = time.monotonic()
                wait_for(lambda: agent.metric("headrace_agent_drift_repairs_total") > repairs, 5, "repair counted")
                wait_for(lambda: headrace_rules(early.netns.path) == rules, 5, "boot-race pod's rules repaired")
                back = time.monotonic() - flushed
                assert back <= 2.0, f"rules back only after {back:.2f} s"
                with Listener(early.netns.path, 15001, label="out2") as out:
                    assert tcp_request(early.netns.path, peer.ipv4, 8080, b"o") == b"out2|o"
                row = agent.status()[early.uid]
                assert row["state"] == "enrolled" and row["boot_race"] == "repaired"
            else:
                time.sleep(1.5)
                assert headrace_rules(early.netns.path) == []
                assert direct_or_redirected(early.netns.path, peer.ipv4) == b"peer|o"
                assert agent.status()[early.uid]["boot_race"] == "flagged"
    finally:
        agent.close()
