"""A simulated Kubernetes node: its own netns, a bridge network made by the real CNI plugins, an objects dir.

    node = SimNode.create(tmp_path)               # node netns + objects dir + IPAM dir, nothing in root netns
    node.add_namespace("shop", labels={...})
    pod = node.add_pod("shop", "web", annotations={"sidecar.istio.io/status": "{}"})
    ...                                             # pod.netns.path, pod.ipv4, pod.ipv6, pod.uid
    node.remove_pod(pod); node.close()             # close() removes everything, also after failures

Pods are network namespaces wired by `bridge` + `host-local` from /usr/lib/cni, chained with `headrace-cni`
(from the venv) when the node's conflist has it. The plugins run inside the node netns, as a runtime on
that node would. Subnets are chosen at random (10.200.0.0/13 and a ULA /64) so parallel tests don't clash.

`SimNode.create(..., pod_cgroups=True)` makes pods like a real runtime does: before the chain ADD each pod
gets an infra ("pause") process (`sleep infinity` entered into the pod netns) in a cgroup v2 directory laid
out like kubelet's cgroupfs driver, `/sys/fs/cgroup/unified/headrace-test-<node>/kubepods/pod<uid>/<id>`
(`pod.pod_cgroup` is the pod level, `pod.cgroup` the container). The agent's /proc scan then finds the
pod's netns and cgroup (needed by the eBPF backend). Removing the pod or the node kills the process and
removes the directories, also after failures. `node.proxy_cgroup()` makes a cgroup for the node proxy.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node_agent.install_cni.runtime import front_binary
from node_agent.lab.cni_runner import CniRunner
from node_agent.lab.netns import NetNS, unique
from node_agent.lab.objects import ns_object, pod_object, write_object
from node_agent.lab.plugin_launcher import write_plugin_launcher
from node_agent.lab.pod_cgroups import CGROUP2_ROOT, kill_if_in, remove_tree, rmdir_cgroup, sleeper

CNI_PLUGIN_DIR = "/usr/lib/cni"
VENV_BIN = Path(sys.executable).parent
HEADRACE_CNI = VENV_BIN / "headrace-cni"


NODE_NETNS_PREFIX = "hrnode-"
NODE_CGROUP_PREFIX = "headrace-test-"  # + the node netns' name: `SimNode.cgroup_base`


def remove_stale_node_cgroups(netns_dir: Path = Path("/run/netns")) -> list[Path]:
    """Remove the cgroup subtrees of nodes whose netns is gone, killing what still runs inside (the pods'
    infra processes): what a run killed without its teardown (SIGKILL) leaves (nothing without a cgroup2
    mount at CGROUP2_ROOT). A live node's netns
    exists for as long as its subtree does (made after it, removed before it), so another run's nodes
    are never touched. Returns what was removed."""
    removed = []
    for base in sorted(CGROUP2_ROOT.glob(f"{NODE_CGROUP_PREFIX}{NODE_NETNS_PREFIX}*")):
        if not (netns_dir / base.name.removeprefix(NODE_CGROUP_PREFIX)).exists():
            remove_tree(base)
            removed.append(base)
    return removed


def random_subnets() -> tuple[ipaddress.IPv4Network, ipaddress.IPv6Network]:
    v4 = ipaddress.IPv4Network(f"10.{200 + secrets.randbelow(8)}.{secrets.randbelow(256)}.0/24")
    v6 = ipaddress.IPv6Network(f"fd{secrets.token_hex(1)}:{secrets.token_hex(2)}:{secrets.token_hex(2)}::/64")
    return v4, v6


@dataclass
class Pod:
    namespace: str
    name: str
    uid: str
    netns: NetNS
    container_id: str
    result: dict[str, Any]
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    cgroup: str | None = None  # the infra process's (container-level) cgroup v2 dir, with pod_cgroups
    pause_pid: int | None = None

    @property
    def pod_cgroup(self) -> str | None:
        """The pod-level cgroup v2 directory (`.../kubepods/pod<uid>`), None without pod_cgroups."""
        return str(Path(self.cgroup).parent) if self.cgroup else None

    def _ip(self, version: int) -> str | None:
        for entry in self.result.get("ips", []):
            iface = ipaddress.ip_interface(entry["address"])
            if iface.version == version:
                return str(iface.ip)
        return None

    @property
    def ipv4(self) -> str:
        ip = self._ip(4)
        assert ip, f"pod {self.name} has no IPv4 address"
        return ip

    @property
    def ipv6(self) -> str:
        ip = self._ip(6)
        assert ip, f"pod {self.name} has no IPv6 address"
        return ip

    @property
    def cni_args(self) -> dict[str, str]:
        return {
            "IgnoreUnknown": "1",
            "K8S_POD_NAMESPACE": self.namespace,
            "K8S_POD_NAME": self.name,
            "K8S_POD_UID": self.uid,
            "K8S_POD_INFRA_CONTAINER_ID": self.container_id,
        }


@dataclass
class SimNode:
    root: Path
    netns: NetNS
    bridge: str
    subnet_v4: ipaddress.IPv4Network
    subnet_v6: ipaddress.IPv6Network
    dual_stack: bool = True
    headrace: dict[str, Any] | None = field(default_factory=dict)
    pods: dict[str, Pod] = field(default_factory=dict)
    pod_cgroups: bool = False
    _pause: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    # -- life cycle -------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        root: Path,
        *,
        dual_stack: bool = True,
        headrace: dict[str, Any] | None = None,
        pod_cgroups: bool = False,
        front: bool | None = None,
    ) -> SimNode:
        """A node netns and directories under root. headrace=None: a chain without headrace-cni; a dict:
        extra fields of the headrace-cni entry (defaults: objects_dir, log_file, agent_socket in root).
        pod_cgroups: give every pod an infra process in a kubelet-like cgroup v2 directory. front: the
        plugin's launcher names the compiled front (`write_plugin_launcher`), as install-cni's does; by
        default when it is built."""
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("objects", "ipam", "cache", "bin", "state", "log"):
            (root / sub).mkdir(exist_ok=True)
        write_plugin_launcher(root / "bin" / "headrace-cni", str(root / "state" / "cni.sock"),
                              front=bool(front_binary()) if front is None else front)
        v4, v6 = random_subnets()
        netns = NetNS.create(NODE_NETNS_PREFIX)
        node = cls(root, netns, unique("hrb", 8), v4, v6, dual_stack, headrace, pod_cgroups=pod_cgroups)
        try:
            netns.sysctl("net.ipv4.ip_forward", "1")
            netns.sysctl("net.ipv6.conf.all.forwarding", "1")
        except BaseException:
            node.close()
            raise
        return node

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description, so another process (`headrace lab down`) can take the node over."""
        return {
            "root": str(self.root),
            "netns": self.netns.name,
            "bridge": self.bridge,
            "subnet_v4": str(self.subnet_v4),
            "subnet_v6": str(self.subnet_v6),
            "dual_stack": self.dual_stack,
            "headrace": self.headrace,
            "pod_cgroups": self.pod_cgroups,
            "pods": [
                {
                    "namespace": p.namespace,
                    "name": p.name,
                    "uid": p.uid,
                    "netns": p.netns.name,
                    "container_id": p.container_id,
                    "result": p.result,
                    "labels": p.labels,
                    "annotations": p.annotations,
                    "cgroup": p.cgroup,
                    "pause_pid": p.pause_pid,
                }
                for p in self.pods.values()
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimNode:
        node = cls(
            Path(data["root"]),
            NetNS(data["netns"]),
            data["bridge"],
            ipaddress.IPv4Network(data["subnet_v4"]),
            ipaddress.IPv6Network(data["subnet_v6"]),
            bool(data["dual_stack"]),
            data["headrace"],
            pod_cgroups=bool(data.get("pod_cgroups", False)),
        )
        for p in data["pods"]:
            pod = Pod(
                p["namespace"],
                p["name"],
                p["uid"],
                NetNS(p["netns"]),
                p["container_id"],
                p["result"],
                p["labels"],
                p["annotations"],
                p.get("cgroup"),
                p.get("pause_pid"),
            )
            node.pods[pod.uid] = pod
        return node

    def close(self) -> None:
        """Remove every pod (CNI DEL best effort), the pod netns, the node netns (and its bridge)."""
        for pod in list(self.pods.values()):
            try:
                self.remove_pod(pod)
            except Exception:
                self._stop_pause(pod)
                pod.netns.delete()
                self.pods.pop(pod.uid, None)
        try:
            self.remove_cgroups()
        finally:
            self.netns.delete()

    # -- configuration ------------------------------------------------------------------------------------
    @property
    def objects_dir(self) -> Path:
        return self.root / "objects"

    @property
    def cgroup_base(self) -> Path:
        """This node's cgroup v2 subtree (pod_cgroups): everything of the node's pods and proxy is below."""
        return CGROUP2_ROOT / f"{NODE_CGROUP_PREFIX}{self.netns.name}"

    def proxy_cgroup(self) -> Path:
        """A cgroup v2 directory for the node proxy (ambient eBPF answers SO_ORIGINAL_DST there)."""
        path = self.cgroup_base / "headrace-proxy"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def remove_cgroups(self) -> None:
        """Remove the node's cgroup subtree, deepest first; processes still inside are killed first."""
        remove_tree(self.cgroup_base)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def log_file(self) -> Path:
        return self.root / "log" / "cni.log"

    @property
    def agent_socket(self) -> Path:
        return self.state_dir / "cni.sock"

    @property
    def cni_path(self) -> list[str]:
        return [CNI_PLUGIN_DIR, str(self.root / "bin")]

    def headrace_entry(self) -> dict[str, Any] | None:
        if self.headrace is None:
            return None
        entry: dict[str, Any] = {
            "type": "headrace-cni",
            "objects_dir": str(self.objects_dir),
            "log_file": str(self.log_file),
            "agent_socket": str(self.agent_socket),
        }
        entry.update(self.headrace)
        return entry

    def conflist(self, cni_version: str = "1.0.0") -> dict[str, Any]:
        ranges: list[list[dict[str, str]]] = [[{"subnet": str(self.subnet_v4)}]]
        if self.dual_stack:
            ranges.append([{"subnet": str(self.subnet_v6)}])
        plugins: list[dict[str, Any]] = [
            {
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": ranges,
                    "routes": [{"dst": "0.0.0.0/0"}] + ([{"dst": "::/0"}] if self.dual_stack else []),
                    "dataDir": str(self.root / "ipam"),
                },
            }
        ]
        entry = self.headrace_entry()
        if entry is not None:
            plugins.append(entry)
        return {"cniVersion": cni_version, "name": f"net-{self.bridge}", "plugins": plugins}

    def runner(self, cni_version: str = "1.0.0") -> CniRunner:
        return CniRunner(self.conflist(cni_version), self.cni_path, self.root / "cache", run_netns=self.netns.path)

    # -- Kubernetes-shaped objects -------------------------------------------------------------------------
    def add_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        write_object(self.objects_dir, f"namespace-{name}.json", ns_object(name, labels=labels, uid=str(uuid.uuid4())))

    def set_namespace_labels(self, name: str, labels: dict[str, str]) -> None:
        path = self.objects_dir / f"namespace-{name}.json"
        obj = json.loads(path.read_text())
        obj["metadata"]["labels"] = labels
        write_object(self.objects_dir, path.name, obj)

    def write_pod(self, pod: Pod) -> None:
        ips = [e["address"].split("/")[0] for e in pod.result.get("ips", [])]
        obj = pod_object(pod.namespace, pod.name, pod.uid, ips, pod.labels, self.netns.name,
                         annotations=pod.annotations, container="app")  # fmt: skip
        write_object(self.objects_dir, f"pod-{pod.namespace}-{pod.name}.json", obj)

    def set_pod_labels(self, pod: Pod, labels: dict[str, str]) -> None:
        pod.labels = dict(labels)
        self.write_pod(pod)

    # -- pods ----------------------------------------------------------------------------------------------
    def add_pod(
        self,
        namespace: str,
        name: str,
        *,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        cni_version: str = "1.0.0",
        before_add: Callable[[Pod], None] | None = None,
    ) -> Pod:
        """Write the Pod object (before ADD, as the API server has it), make its netns, run the chain ADD.
        `before_add(pod)`: run once the netns (and the pod's infra process) exist, just before the ADD."""
        if not (self.objects_dir / f"namespace-{namespace}.json").exists():
            self.add_namespace(namespace)
        netns = NetNS.create("hrpod-")
        pod = Pod(
            namespace,
            name,
            str(uuid.uuid4()),
            netns,
            secrets.token_hex(16),
            {},
            dict(labels or {}),
            dict(annotations or {}),
        )
        self.write_pod(pod)
        try:
            if self.pod_cgroups:
                self._start_pause(pod)
            if before_add is not None:
                before_add(pod)
            pod.result = self.runner(cni_version).add(pod.container_id, netns.path, args=pod.cni_args)
        except BaseException:
            with contextlib.suppress(Exception):
                self.runner(cni_version).delete(pod.container_id, netns.path, args=pod.cni_args)
            self._stop_pause(pod)
            netns.delete()
            (self.objects_dir / f"pod-{namespace}-{name}.json").unlink(missing_ok=True)
            raise
        self.pods[pod.uid] = pod
        self.write_pod(pod)  # now with its IPs in status
        return pod

    def remove_pod(self, pod: Pod, cni_version: str = "1.0.0") -> None:
        try:
            self.runner(cni_version).delete(pod.container_id, pod.netns.path, args=pod.cni_args)
        finally:
            self._stop_pause(pod)
            pod.netns.delete()
            self.pods.pop(pod.uid, None)
            (self.objects_dir / f"pod-{pod.namespace}-{pod.name}.json").unlink(missing_ok=True)

    def vanish_pod(self, pod: Pod, *, object_too: bool = True) -> None:
        """The pod's sandbox gone with no CNI DEL (a runtime that lost it): infra process killed, cgroups and
        netns deleted, and (`object_too`) the object removed. The pod stays in `pods`: `remove_pod` runs the
        DEL that may come later."""
        self._stop_pause(pod)
        pod.netns.delete()
        if object_too:
            (self.objects_dir / f"pod-{pod.namespace}-{pod.name}.json").unlink(missing_ok=True)

    # -- infra ("pause") processes in pod cgroups ---------------------------------------------------------
    def _start_pause(self, pod: Pod) -> None:
        """The pod's infra process: `sleep infinity` in the pod netns, moved into its container cgroup."""
        cg = self.cgroup_base / "kubepods" / f"pod{pod.uid}" / pod.container_id
        pod.cgroup = str(cg)
        proc = sleeper(cg, pod.netns.path)
        self._pause[pod.uid] = proc
        pod.pause_pid = proc.pid

    def _stop_pause(self, pod: Pod) -> None:
        proc = self._pause.pop(pod.uid, None)
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        elif pod.pause_pid is not None:  # a node taken over with from_dict
            kill_if_in(pod.pause_pid, pod.cgroup)
        pod.pause_pid = None
        if pod.cgroup:
            cg = Path(pod.cgroup)
            rmdir_cgroup(cg)
            rmdir_cgroup(cg.parent)

    def cleanup_files(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
