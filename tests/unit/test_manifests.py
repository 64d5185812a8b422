"""deploy/: every manifest validates offline against the Kubernetes OpenAPI schemas of the minimum
supported version and a current one (strict: unknown fields are errors), RBAC reads pods/namespaces and
patches only pods/status (plus get of its own DaemonSet), and the DaemonSet mounts every path its ConfigMap and
arguments use, as the process inside the container sees it — also with each distribution's host-path
component (k3s, GKE, OpenShift) applied."""

from __future__ import annotations

import copy
import os
import posixpath
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from node_agent.agent.config import BACKEND_SETTINGS, build_config, parse_metrics_addr
from node_agent.backends.iptables.xt_fresh_write import DEFAULT_LOCK
from node_agent.netns.conntrack import KEY as CONNTRACK_SYSCTL

ROOT = Path(__file__).parent.parent.parent
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.33.0"  # schemas shipped with kubernetes-validate
#: The minimum Kubernetes version (stated in daemonset.yaml and docs/deploy.md): appArmorProfile is 1.30.
MIN_K8S_VERSION = "1.30.0"
MANIFESTS = sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")
PLATFORMS = ("k3s", "gke", "openshift")
PLATFORM_PATHS = {  # (CNI conf dir, CNI bin dir) on each distribution's nodes
    None: ("/etc/cni/net.d", "/opt/cni/bin"),
    "k3s": ("/var/lib/rancher/k3s/agent/etc/cni/net.d", "/var/lib/rancher/k3s/data/cni"),
    "gke": ("/etc/cni/net.d", "/home/kubernetes/bin"),
    "openshift": ("/etc/kubernetes/cni/net.d", "/var/lib/cni/bin"),
}


def _pointer(doc: Any, path: str) -> tuple[Any, str | int]:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    for part in parts[:-1]:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    last = parts[-1]
    return doc, int(last) if isinstance(doc, list) else last


def apply_component(docs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The component's JSON6902 patches (test, replace, add, remove) applied, as kustomize does; its extra
    resources added."""
    comp_dir = DEPLOY / "components" / name
    comp = yaml.safe_load((comp_dir / "kustomization.yaml").read_text())
    assert comp["kind"] == "Component"
    out = copy.deepcopy(docs)
    for patch in comp.get("patches", []):
        targets = [d for d in out if d["kind"] == patch["target"]["kind"]
                   and d["metadata"]["name"] == patch["target"]["name"]]
        assert len(targets) == 1, patch["target"]
        for op in yaml.safe_load(patch["patch"]):
            parent, key = _pointer(targets[0], op["path"])
            if op["op"] == "test":
                assert parent[key] == op["value"], op
            elif op["op"] == "add":
                assert isinstance(parent, dict) and key not in parent, op  # never a silent replace
                parent[key] = op["value"]
            else:
                assert op["op"] in ("replace", "remove"), op
                assert (key in parent) if isinstance(parent, dict) else (isinstance(key, int) and key < len(parent)), op
                if op["op"] == "replace":
                    parent[key] = op["value"]
                else:
                    del parent[key]
    for res in comp.get("resources", []):
        out.extend(d for d in yaml.safe_load_all((comp_dir / res).read_text()) if d)
    return out


def load_all(platform: str | None = None) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for p in MANIFESTS:
        docs.extend(d for d in yaml.safe_load_all(p.read_text()) if d)
    return apply_component(docs, platform) if platform else docs


def one(kind: str, platform: str | None = None) -> dict[str, Any]:
    found = [d for d in load_all(platform) if d["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


@pytest.mark.parametrize("version", [MIN_K8S_VERSION, K8S_VERSION])
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates(path, version):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc:
            kubernetes_validate.validate(doc, version, strict=True)


def test_minimum_version_is_stated():
    assert f"Minimum Kubernetes version: {MIN_K8S_VERSION.rsplit('.', 1)[0]}" in (DEPLOY / "daemonset.yaml").read_text()
    assert f"Kubernetes {MIN_K8S_VERSION.rsplit('.', 1)[0]} or newer" in (ROOT / "docs" / "deploy.md").read_text()


@pytest.mark.parametrize("platform", PLATFORMS)
def test_platform_component_validates_and_sets_its_paths(platform):
    docs = load_all(platform)
    for doc in docs:
        kubernetes_validate.validate(doc, MIN_K8S_VERSION, strict=True)
    data = one("ConfigMap", platform)["data"]
    assert (data["CNI_CONF_DIR"], data["CNI_BIN_DIR"]) == PLATFORM_PATHS[platform]


@pytest.mark.parametrize("platform", [None, *PLATFORMS])
def test_openshift_runs_every_container_as_spc_t(platform):
    """CRI-O runs containers as container_t, which SELinux keeps from writing the host's CNI dirs, entering
    pod netns and using the bpffs; the openshift component gives each container spc_t."""
    for c in containers(platform):
        selinux = c["securityContext"].get("seLinuxOptions")
        assert selinux == ({"type": "spc_t"} if platform == "openshift" else None), c["name"]
    assert "securityContext" not in pod_spec(platform)  # per container, nothing pod-wide


#: Container-Optimized OS (GKE's default node image): the root filesystem is read-only; these trees are
#: writable (a DirectoryOrCreate/FileOrCreate hostPath can be made there) ...
COS_WRITABLE = ("/home/", "/var/", "/etc/", "/run/", "/tmp/")
#: ... and these exist (so no one tries to create them). /usr/src does not exist there.
COS_PRESENT = ("/proc", "/sys/fs/cgroup", "/sys/fs/bpf", "/lib/modules")


def test_gke_component_fits_container_optimized_os():
    data = one("ConfigMap", "gke")["data"]
    # the plugin's runtime is executed by the runtime's CNI call: on COS only /home/kubernetes/bin is both
    # writable and executable (/home is mounted noexec)
    assert data["HEADRACE_INSTALL_DIR"].startswith(data["CNI_BIN_DIR"] + "/")
    assert data["CNI_BIN_DIR"] == "/home/kubernetes/bin"
    for v in pod_spec("gke")["volumes"]:
        if "hostPath" in v:
            path = v["hostPath"]["path"]
            assert path.startswith(COS_WRITABLE) or path in COS_PRESENT, f"{v['name']}: {path} on a read-only root"
    agent = next(c for c in containers("gke") if c["name"] == "agent")
    assert mounted_host_path(agent, "/usr/src") is None
    # standard nodes keep the headers the eBPF backend compiles against
    agent = next(c for c in containers() if c["name"] == "agent")
    assert mounted_host_path(agent, "/usr/src") == "/usr/src"
    assert mounted_host_path(agent, "/lib/modules") == "/lib/modules"


def test_gke_component_admits_the_priority_class_in_the_agents_namespace():
    """GKE admits system-node-critical pods outside kube-system only with a ResourceQuota scoped to it."""
    ds = one("DaemonSet", "gke")
    quota = one("ResourceQuota", "gke")
    assert quota["metadata"]["namespace"] == ds["metadata"]["namespace"]
    priority_class = ds["spec"]["template"]["spec"]["priorityClassName"]
    assert quota["spec"]["scopeSelector"]["matchExpressions"] == [
        {"scopeName": "PriorityClass", "operator": "In", "values": [priority_class]}
    ]
    assert int(quota["spec"]["hard"]["pods"]) >= 15000  # one agent pod per node, on clusters of any size
    assert not [d for d in load_all() if d["kind"] == "ResourceQuota"]  # elsewhere the class needs none


def test_podmonitor_selects_the_agent_pods_metrics_port():
    comp = yaml.safe_load((DEPLOY / "components" / "podmonitor" / "kustomization.yaml").read_text())
    assert comp["kind"] == "Component"
    pm = yaml.safe_load((DEPLOY / "components" / "podmonitor" / comp["resources"][0]).read_text())
    assert pm["kind"] == "PodMonitor" and pm["apiVersion"] == "monitoring.coreos.com/v1"
    template = one("DaemonSet")["spec"]["template"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    agent = next(c for c in template["spec"]["containers"] if c["name"] == "agent")
    endpoint = pm["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] in [p["name"] for p in agent["ports"]] and endpoint["path"] == "/metrics"
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == agent["ports"][0]["containerPort"]


def test_validator_is_strict():
    ds = copy.deepcopy(one("DaemonSet"))
    ds["spec"]["template"]["spec"]["containers"][0]["bogusField"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_and_one_namespace():
    k = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(p.name for p in MANIFESTS)
    namespaced = [d for d in load_all() if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding",
                                                              "PriorityClass")]
    assert {d["metadata"]["namespace"] for d in namespaced} == {k["namespace"]} == {"headrace-system"}


def test_rbac_reads_pods_and_namespaces_and_patches_only_pod_status():
    role = one("ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods", "namespaces"],
                              "verbs": ["get", "list", "watch"]},
                             {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]}]
    binding = one("ClusterRoleBinding")
    sa = one("ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    # namespaced: get of its own DaemonSet only (install-cni: deleted or updated?)
    role = one("Role")
    assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["daemonsets"],
                              "resourceNames": [one("DaemonSet")["metadata"]["name"]], "verbs": ["get"]}]
    assert one("RoleBinding")["subjects"] == binding["subjects"]
    assert one("RoleBinding")["roleRef"]["name"] == role["metadata"]["name"]


def pod_spec(platform: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = one("DaemonSet", platform)["spec"]["template"]["spec"]
    return spec


def containers(platform: str | None = None) -> list[dict[str, Any]]:
    spec = pod_spec(platform)
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_daemonset_shape():
    spec = pod_spec()
    assert spec["hostPID"] and spec["hostNetwork"]
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    install = next(c for c in spec["containers"] if c["name"] == "install-cni")
    assert "--owner-daemonset=" + one("DaemonSet")["metadata"]["name"] in install["args"]
    assert "install-cni --check" in install["readinessProbe"]["exec"]["command"][-1]
    assert spec["serviceAccountName"] == one("ServiceAccount")["metadata"]["name"]
    agent = next(c for c in spec["containers"] if c["name"] == "agent")
    assert "--owner-daemonset=" + one("DaemonSet")["metadata"]["name"] in agent["args"]
    sc = agent["securityContext"]
    # privileged: /proc/sys writable (nf_conntrack_tcp_loose in pod netns); it grants every capability
    assert sc["privileged"] is True and "capabilities" not in sc
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsUser"] == 0
    assert sc["seccompProfile"] == sc["appArmorProfile"] == {"type": "Unconfined"}
    for c in containers():
        if c["name"] != "agent":
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert not c["securityContext"].get("privileged"), c["name"]


def test_privileged_says_why():
    """The comment above `privileged: true` names the sysctl that needs it."""
    lines = (DEPLOY / "daemonset.yaml").read_text().splitlines()
    at = [i for i, line in enumerate(lines) if line.strip() == "privileged: true"]
    assert len(at) == 1
    comment = []
    for line in reversed(lines[:at[0]]):
        if not line.strip().startswith("#"):
            break
        comment.append(line)
    assert CONNTRACK_SYSCTL.rsplit(".", 1)[1] in " ".join(comment)


@pytest.mark.parametrize("platform", [None, *PLATFORMS])
def test_security_contexts_pass_the_api_servers_own_checks(platform):
    """What the schemas cannot say and the API server refuses (ValidateSecurityContext):
    allowPrivilegeEscalation: false together with privileged: true or an added `CAP_SYS_ADMIN`."""
    for c in containers(platform):
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is False:
            assert not sc.get("privileged"), c["name"]
            assert "CAP_SYS_ADMIN" not in sc.get("capabilities", {}).get("add", []), c["name"]


def test_configmap_comments_name_every_setting_value():
    """The comment above a choice lists what the agent accepts (config.BACKEND_SETTINGS)."""
    text = (DEPLOY / "configmap.yaml").read_text()
    listed = re.search(r"# redirect backend: ([a-z |]+);", text)
    assert listed is not None
    assert tuple(v.strip() for v in listed.group(1).split("|")) == BACKEND_SETTINGS
    assert one("ConfigMap")["data"]["HEADRACE_BACKEND"] in BACKEND_SETTINGS


def test_rbac_is_documented_as_it_is():
    """docs/deploy.md's row for rbac.yaml names every resource and verb the ClusterRole grants."""
    row = next(line for line in (ROOT / "docs" / "deploy.md").read_text().splitlines()
               if line.startswith("| `rbac.yaml` |"))
    for rule in one("ClusterRole")["rules"]:
        for resource in rule["resources"]:
            assert f"`{resource}`" in row, resource
        for verb in rule["verbs"]:
            assert f"`{verb}`" in row, verb


def test_probes_on_the_metrics_port():
    data = one("ConfigMap")["data"]
    port = int(data["HEADRACE_METRICS_ADDR"].rsplit(":", 1)[1])
    agent = next(c for c in pod_spec()["containers"] if c["name"] == "agent")
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert agent["ports"][0]["containerPort"] == port


def test_metrics_listen_on_every_address_ipv4_and_ipv6():
    """The kubelet probes the pod's IP, the node's (hostNetwork): an IPv6 address on IPv6-only clusters.
    `::` is the agent's dual-stack listener (IPv4 too)."""
    addr = parse_metrics_addr(one("ConfigMap")["data"]["HEADRACE_METRICS_ADDR"])
    assert addr is not None and addr.host == "::"


def expanded_args(container: dict[str, Any], platform: str | None = None) -> list[str]:
    env: dict[str, str] = {}
    cm = one("ConfigMap", platform)
    for src in container.get("envFrom", []):
        assert src["configMapRef"]["name"] == cm["metadata"]["name"]
        env.update(cm["data"])
    for e in container.get("env", []):
        env[e["name"]] = e.get("value", f"<{e['name']}>")
    out = []
    for a in container.get("args", []):
        missing = [v for v in re.findall(r"\$\((\w+)\)", a) if v not in env]
        assert not missing, f"{container['name']}: {a} uses undefined {missing}"
        out.append(re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a))
    return out


def mounted_host_path(container: dict[str, Any], path: str, platform: str | None = None) -> str | None:
    """The host path behind `path` inside the container, or None when no mount covers it."""
    volumes = {v["name"]: v for v in pod_spec(platform)["volumes"]}
    best: tuple[int, str] | None = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            host = volumes[m["name"]].get("hostPath", {}).get("path")
            if host is not None and (best is None or len(mp) > best[0]):
                best = (len(mp), host.rstrip("/") + path[len(mp):])
    return best[1] if best else None


PATH_OPTIONS = ("--cni-conf-dir", "--cni-bin-dir", "--install-dir", "--kubeconfig", "--state-dir",
                "--cni-socket", "--proxy-socket", "--agent-socket", "--log-file", "--bpffs-dir")


@pytest.mark.parametrize("platform", [None, *PLATFORMS])
@pytest.mark.parametrize("name", ["install-plugin", "agent", "install-cni"])
def test_every_path_in_args_is_mounted_from_the_same_host_path(name, platform):
    c = next(c for c in containers(platform) if c["name"] == name)
    args = expanded_args(c, platform)
    opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    host_root = opts.get("host-root", "/")
    checked = 0
    for opt, value in opts.items():
        if f"--{opt}" not in PATH_OPTIONS:
            continue
        assert value.startswith("/"), f"{opt}={value}"
        if opt == "cni-conf-dir" and "--skip-config" in args:
            continue  # not touched by this container
        if opt == "kubeconfig" and host_root != "/":
            continue  # written by this container under --install-dir, checked there
        inside = posixpath.join(host_root, value.lstrip("/"))
        assert mounted_host_path(c, inside, platform) == value, f"{name}: {opt}={value} not mounted at {inside}"
        checked += 1
    assert checked >= 2


def test_every_configmap_path_is_used_and_mounted():
    data = one("ConfigMap")["data"]
    all_args = [a for c in containers() for a in expanded_args(c)]
    for key, value in data.items():
        if value.startswith("/"):
            assert any(a.endswith("=" + value) for a in all_args), f"{key} is not used by any container"


def test_agent_mounts_the_host_paths_discovery_and_ebpf_need():
    agent = next(c for c in pod_spec()["containers"] if c["name"] == "agent")
    for inside, host in [("/var/run/headrace", "/var/run/headrace"), ("/var/run/netns", "/var/run/netns"),
                         ("/host/proc", "/proc"), ("/sys/fs/cgroup", "/sys/fs/cgroup"),
                         ("/sys/fs/bpf", "/sys/fs/bpf"), ("/var/run/headrace/bpf", "/var/run/headrace/bpf")]:
        assert mounted_host_path(agent, inside) == host, inside
    propagation = {m["mountPath"]: m.get("mountPropagation") for m in agent["volumeMounts"]}
    assert propagation["/var/run/netns"] == "HostToContainer"  # netns created after the agent started


@pytest.mark.parametrize("platform", [None, *PLATFORMS])
def test_agent_keeps_its_ebpf_pins_in_the_nodes_bpffs(platform, tmp_path):
    """--bpffs-dir is a directory of the node's own bpffs instance (the host's /sys/fs/bpf, writable, its
    mounts propagated into the container): pins made there are files of that instance and outlive the
    agent's container, unlike a bpffs the agent mounts in its own mount namespace. The agent binds it at
    <state-dir>/bpf, so it must lie outside the state dir (the agent's config refuses it there)."""
    agent = next(c for c in containers(platform) if c["name"] == "agent")
    opts = dict(a[2:].split("=", 1) for a in expanded_args(agent, platform) if a.startswith("--") and "=" in a)
    pins = Path(opts["bpffs-dir"])
    mount = next(m for m in agent["volumeMounts"] if m["mountPath"] == str(pins.parent))
    volume = next(v for v in pod_spec(platform)["volumes"] if v["name"] == mount["name"])
    assert volume["hostPath"]["path"] == mount["mountPath"] == "/sys/fs/bpf"
    assert mount.get("mountPropagation") == "HostToContainer" and not mount.get("readOnly")
    config = build_config(objects_dir=tmp_path, state_dir=opts["state-dir"], bpffs_dir=opts["bpffs-dir"])
    assert config.bpffs_dir == pins and config.state_dir not in pins.parents


def may_write_iptables(container: dict[str, Any]) -> bool:
    sc = container.get("securityContext", {})
    return bool(sc.get("privileged")) or "NET_ADMIN" in sc.get("capabilities", {}).get("add", [])


@pytest.mark.parametrize("platform", [None, *PLATFORMS])
def test_iptables_writers_share_the_hosts_xtables_lock(platform):
    """Legacy iptables (iptables-legacy-restore --wait, the agent's in-process writer) opens its lock with
    O_CREAT: under a read-only root filesystem the path must be a mount, and the host's own file, so that
    the agent and kube-proxy (and the plugin, on the host) take turns."""
    writers = [c for c in containers(platform) if may_write_iptables(c)]
    assert [c["name"] for c in writers] == ["agent"]
    volumes = {v["name"]: v for v in pod_spec(platform)["volumes"]}
    for c in writers:
        env = {e["name"] for e in c.get("env", [])} | set(one("ConfigMap", platform)["data"])
        assert "XTABLES_LOCKFILE" not in env  # the lock is iptables' default path, as kube-proxy's
        assert c["securityContext"]["readOnlyRootFilesystem"]
        mounts = [m for m in c["volumeMounts"] if m["mountPath"] == DEFAULT_LOCK]
        assert len(mounts) == 1 and not mounts[0].get("readOnly"), c["name"]
        assert volumes[mounts[0]["name"]]["hostPath"] == {"path": DEFAULT_LOCK, "type": "FileOrCreate"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for kustomize) not installed")
def test_kustomize_build_renders_valid_objects():
    proc = subprocess.run(["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert sorted(d["kind"] for d in docs) == sorted(d["kind"] for d in load_all())
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "headrace"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for kustomize) not installed")
@pytest.mark.parametrize("platform", PLATFORMS)
def test_kustomize_renders_each_component_as_the_test_applies_it(platform, tmp_path):
    """kustomize agrees with apply_component above (which runs in CI even without kubectl)."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(DEPLOY, tmp_path)],
        "components": [os.path.relpath(DEPLOY / "components" / platform, tmp_path),
                       os.path.relpath(DEPLOY / "components" / "podmonitor", tmp_path)],
    }))
    proc = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(proc.stdout) if d}
    assert "PodMonitor" in docs
    assert docs["ConfigMap"]["data"] == one("ConfigMap", platform)["data"]
    rendered, ours = docs["DaemonSet"]["spec"]["template"]["spec"], pod_spec(platform)
    assert rendered["volumes"] == ours["volumes"]
    for a, b in zip([*rendered["initContainers"], *rendered["containers"]], containers(platform), strict=True):
        assert a["volumeMounts"] == b["volumeMounts"], a["name"]
        assert a["securityContext"] == b["securityContext"], a["name"]


def test_containerfile_copies_existing_sources_and_matches_the_manifests():
    text = (DEPLOY / "Containerfile").read_text()
    for line in text.splitlines():
        m = re.match(r"COPY\s+(?!--from)(.+)\s+\S+$", line)
        if m:
            for src in m.group(1).split():
                assert (ROOT / src).exists(), f"Containerfile copies missing {src}"
    assert 'ENTRYPOINT ["headrace"]' in text
    k = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    image = f'{k["images"][0]["name"]}:{k["images"][0]["newTag"]}'
    assert image in text  # the build command in the header
    for c in containers():
        assert c["image"] == image and c["command"] == ["headrace"]
