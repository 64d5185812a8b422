"""The agent's part of a relayed DEL (serve/relayed_del.py) on the reconciler with fakes: what the agent holds
is let go (a sidecar pod's rules written like the plugin's come out here), a pod it does not hold is
decided from its pod cache, and every case whose rules may be the plugin's own is left to the plugin's DEL
(Declined) — before the agent changes anything when it does not hold the pod."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from node_agent.reconcile.state import Outcome
from node_agent.serve.pod_cache import Lookup
from node_agent.serve.relayed_del import RelayedDel
from node_agent.serve.warm_add import WarmAdd

from cni.contract.kube_objects import Namespace, Pod
from cni.plugin import cni_env, netconf
from cni.plugin.log import JsonLog
from cni.plugin.relayed import Declined
from tests.unit.test_agent_reconcile import AMBIENT, UID, Env, pod
from tests.unit.test_agent_warm_add import SIDECAR, Named, Setup
from tests.unit.test_cni_plugin_process import pod_netns

__all__ = ["pod_netns"]  # fixture

GONE = "/proc/self/fd/999999/gone"  # a netns path that no longer exists (the sandbox went first)


class Relay:
    def __init__(self, env: Env, tmp: Path, lookup: Lookup | None = None) -> None:
        self.env = env
        self.log_file = tmp / "plugin.log"
        self.deleting = RelayedDel(env.store, self, env.r.table, lookup=lookup)
        self.agent_dels: list[tuple[str, tuple[str, str] | None]] = []

    def cni_del(self, uid: str, plugin_removes: tuple[str, str] | None = None) -> Outcome:
        """The reconciler's, recorded."""
        self.agent_dels.append((uid, plugin_removes))
        return self.env.r.cni_del(uid, plugin_removes)

    def delete(self, netns: str = GONE, *, uid: str = UID, name: str = "p-1", backend: str = "nftables") -> str:
        """"done", or the reason the DEL was left to the plugin."""
        environ = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c1", "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
                   "CNI_ARGS": f"K8S_POD_NAMESPACE=app;K8S_POD_NAME={name};K8S_POD_UID={uid}",
                   "CNI_PATH": "/opt/cni/bin"}
        conf = {"cniVersion": "1.0.0", "name": "k8s", "type": "headrace-cni", "backend": backend,
                "iptables": "nft", "log_file": str(self.log_file), "objects_dir": str(self.log_file.parent)}
        plog = JsonLog(str(self.log_file), cmd="DEL")
        try:
            self.deleting(cni_env.parse_env(environ), netconf.parse_config(json.dumps(conf).encode(), "DEL"), plog)
        except Declined as exc:
            return f"declined: {exc}"
        finally:
            plog.close()
        return "done"

    def messages(self) -> list[str]:
        return [json.loads(line)["msg"] for line in self.log_file.read_text().splitlines()]


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def sidecar_add(env: Env, backend_name: str = "nftables") -> Setup:
    """The one-request ADD of a sidecar pod, its rules written by the fake backend standing for
    `backend_name`."""
    env.backend.name = backend_name
    s = Setup(env)
    s.warm = WarmAdd(env.store, env.r, env.r.table, Named(env.backend, backend_name), env.r.plugin_sidecars,
                     add_timeout=1)
    env.set({}, pod(annotations=dict(SIDECAR)))
    return s


def held_sidecar(env: Env, backend_name: str = "nftables") -> None:
    """A sidecar pod the agent redirected at its ADD and holds."""
    s = sidecar_add(env, backend_name)
    assert s.add(s.request(backend=backend_name))["state"] == "enrolled"
    assert env.r.pods[UID].mode == "sidecar" and env.backend.rules == {UID: 1}


def test_a_non_mesh_pod_is_answered_from_the_cache(env: Env, tmp_path: Path) -> None:
    relay = Relay(env, tmp_path)
    env.set({}, pod())
    assert relay.delete() == "done"
    assert relay.agent_dels == [] and "mode none: the agent's pod cache" in relay.messages()
    assert relay.deleting.counts() == {"none": 1}


def test_a_held_sidecar_pods_rules_come_out_in_the_agent(env: Env, tmp_path: Path, pod_netns: str) -> None:
    relay = Relay(env, tmp_path)
    held_sidecar(env)
    assert relay.delete(pod_netns) == "done"  # its netns still there: nothing left for the plugin
    assert relay.agent_dels == [(UID, ("nftables", "nft"))]
    assert UID not in env.r.pods and env.backend.rules == {}
    assert "redirect removed by the agent" in relay.messages()
    assert relay.deleting.counts() == {"sidecar": 1}


def test_a_del_right_after_the_add_waits_for_the_hold(env: Env, tmp_path: Path, pod_netns: str) -> None:
    """The agent answers a sidecar pod's ADD and holds it just after: a DEL meanwhile waits for the hold and
    is then the agent's (not left to the plugin as a pod it does not hold)."""
    relay = Relay(env, tmp_path)
    s = sidecar_add(env)
    after: list[Callable[[], None]] = []
    assert s.warm.add(s.request(), s.interims.append, after.append)["state"] == "enrolled"
    outcome: list[str] = []
    deleting = threading.Thread(target=lambda: outcome.append(relay.delete(pod_netns)))
    deleting.start()
    time.sleep(0.2)
    assert outcome == []
    after[0]()
    deleting.join(5)
    assert outcome == ["done"] and env.backend.rules == {} and UID not in env.r.pods


def test_a_sidecar_pod_held_on_another_backend_leaves_its_rules_to_the_plugin(env: Env, tmp_path: Path,
                                                                             pod_netns: str) -> None:
    relay = Relay(env, tmp_path)
    held_sidecar(env, backend_name="ebpf")
    assert relay.delete(pod_netns).startswith("declined: the agent did not remove the sidecar pod's rules")
    assert UID not in env.r.pods  # the agent let go first
    assert relay.deleting.counts() == {"standalone": 1}


def test_a_sidecar_pod_the_agent_does_not_hold_is_the_plugins_while_its_netns_is_there(
        env: Env, tmp_path: Path, pod_netns: str) -> None:
    relay = Relay(env, tmp_path)
    env.set({}, pod(annotations=dict(SIDECAR)))  # redirected by the plugin itself (the agent was down)
    assert relay.delete(pod_netns).startswith("declined: the sidecar pod's rules may be the plugin's own")
    assert relay.agent_dels == []  # nothing done before the plugin's own DEL (which tells the agent)
    assert relay.delete(GONE) == "done"  # the sandbox gone: nothing in it to remove
    assert relay.agent_dels == [(UID, ("nftables", "nft"))]


def test_an_ebpf_sidecar_pod_is_the_agents_alone(env: Env, tmp_path: Path, pod_netns: str) -> None:
    relay = Relay(env, tmp_path)
    env.set({}, pod(annotations=dict(SIDECAR)))
    assert relay.delete(pod_netns, backend="ebpf") == "done"
    assert relay.agent_dels == [(UID, None)]


def test_an_ambient_pod_is_unenrolled(env: Env, tmp_path: Path, pod_netns: str) -> None:
    relay = Relay(env, tmp_path)
    env.fake_netns(UID)
    env.set(AMBIENT, pod())
    env.r.reconcile()
    assert env.state(UID) == "enrolled"
    env.set({}, pod())  # the label gone from the cache meanwhile: held is what counts
    assert relay.delete(pod_netns) == "done"
    assert relay.agent_dels == [(UID, None)] and UID not in env.r.pods and env.backend.rules == {}
    assert "mode ambient: held by the agent" in relay.messages()
    assert relay.deleting.counts() == {"ambient": 1}


def test_a_failed_removal_is_a_warning_and_the_del_succeeds(env: Env, tmp_path: Path) -> None:
    relay = Relay(env, tmp_path)
    env.fake_netns(UID)
    env.set(AMBIENT, pod())
    env.r.reconcile()

    def refuse(target: Any) -> None:
        from node_agent.backends.base import BackendError

        raise BackendError("injected removal failure")

    env.backend.remove = refuse  # type: ignore[method-assign]
    assert relay.delete() == "done"
    assert any(m.startswith("DEL not completed by the agent") for m in relay.messages())
    assert env.state(UID) == "failed"  # retried by the agent


@pytest.mark.parametrize("case", ["not cached", "another uid", "namespace unknown"])
def test_what_the_cache_cannot_tell_is_left_to_the_plugin(env: Env, tmp_path: Path, case: str) -> None:
    relay = Relay(env, tmp_path)
    if case == "another uid":
        env.set({}, pod(uid="aaaaaaaa-0000-0000-0000-000000000009", name="p-1"))
    elif case == "namespace unknown":
        env.store.replace_pods([pod()])  # a pod whose namespace's labels decide, no namespace cached
    outcome = relay.delete()
    assert outcome.startswith("declined:"), outcome
    assert relay.agent_dels == [] and relay.deleting.counts() == {"standalone": 1}


def test_a_pod_the_cache_does_not_have_yet_is_looked_up(env: Env, tmp_path: Path) -> None:
    """A DEL right after the ADD, before the watch delivered the pod: looked up, as the ADD was."""
    looked: list[tuple[str, str]] = []

    def lookup(namespace: str, name: str) -> tuple[Pod | None, Namespace | None]:
        looked.append((namespace, name))
        return pod(), Namespace("app", {})

    relay = Relay(env, tmp_path, lookup)
    assert relay.delete() == "done"
    assert looked == [("app", "p-1")] and relay.agent_dels == []
    assert relay.deleting.counts() == {"lookup": 1, "none": 1}


def test_a_failed_lookup_leaves_the_del_to_the_plugin(env: Env, tmp_path: Path) -> None:
    def lookup(namespace: str, name: str) -> tuple[Pod | None, Namespace | None]:
        raise OSError("API server unreachable")

    relay = Relay(env, tmp_path, lookup)
    assert relay.delete() == "declined: pod lookup failed: API server unreachable"
