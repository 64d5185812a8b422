"""headrace-cni run as the runtime runs it: a subprocess with CNI_* env and the netconf on stdin.

The target netns is a throwaway one held by `unshare --net sleep` (never the test's own netns). No test
here reaches the iptables step: sidecar redirection is proven in tests/kernel/test_cni_plugin.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_cni_agent_client import FakeAgent
from tests.unit.test_cni_podsource import make_handler, serve

PLUGIN = str(Path(sys.executable).parent / "headrace-cni")
REPO = Path(__file__).resolve().parents[2]
PREV_100: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:01", "sandbox": "/x"}],
    "ips": [{"interface": 0, "address": "10.7.0.5/24", "gateway": "10.7.0.1"}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}


@pytest.fixture(scope="module")
def pod_netns() -> Iterator[str]:
    """A network namespace that is not ours, kept alive by a sleeping process (killed by its pid)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare not installed")
    argv = ["unshare", "--net", "sleep", "600"] if os.geteuid() == 0 else ["unshare", "-rn", "sleep", "600"]
    proc = subprocess.Popen(argv)
    path = f"/proc/{proc.pid}/ns/net"
    try:
        for _ in range(100):
            if os.path.exists(path) and os.stat(path).st_ino != os.stat("/proc/self/ns/net").st_ino:
                break
            time.sleep(0.02)
        else:
            pytest.skip("cannot create a network namespace here")
        yield path
    finally:
        proc.kill()
        proc.wait()


class Env:
    def __init__(self, tmp: Path, netns: str) -> None:
        self.tmp = tmp
        self.netns = netns
        self.objects = tmp / "objects"
        self.objects.mkdir()
        self.log = tmp / "cni.log"
        self.sock = tmp / "agent.sock"

    def namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        obj = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}
        (self.objects / f"ns-{name}.json").write_text(json.dumps(obj))

    def pod(
        self,
        ns: str,
        name: str,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        uid: str = "uid-1",
    ) -> None:
        obj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": ns,
                "uid": uid,
                "labels": labels or {},
                "annotations": annotations or {},
            },
            "spec": {"containers": [{"name": "app"}]},
        }
        (self.objects / f"pod-{ns}-{name}.json").write_text(json.dumps(obj))

    def conf(self, version: str = "1.0.0", prev: dict[str, Any] | None = PREV_100, **fields: Any) -> dict[str, Any]:
        c: dict[str, Any] = {
            "cniVersion": version,
            "name": "net1",
            "type": "headrace-cni",
            "objects_dir": str(self.objects),
            "log_file": str(self.log),
            "agent_socket": str(self.sock),
            "agent_timeout": 2,
        }
        if prev is not None:
            c["prevResult"] = prev
        c.update(fields)
        return c

    def run(
        self,
        command: str,
        conf: dict[str, Any] | bytes,
        ns: str = "shop",
        name: str = "web",
        netns: str | None = None,
        **env: str,
    ) -> tuple[int, Any]:
        e = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": "c0ffee",
            "CNI_IFNAME": "eth0",
            "CNI_NETNS": self.netns if netns is None else netns,
            "CNI_PATH": "/usr/lib/cni",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID=uid-1",
            "HEADRACE_CNI_LOG_FILE": str(self.log),
        }
        e.update(env)
        data = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
        proc = subprocess.run([PLUGIN], input=data, env=e, capture_output=True, timeout=30)
        assert proc.stderr == b"", proc.stderr
        out = proc.stdout.decode()
        parsed = json.loads(out) if out.strip() else None
        if out.strip():
            assert out.count("\n") == 1, "stdout must hold exactly one JSON document"
        return proc.returncode, parsed

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []


@pytest.fixture
def env(tmp_path: Path, pod_netns: str) -> Env:
    e = Env(tmp_path, pod_netns)
    e.namespace("shop")
    return e


def assert_error(result: tuple[int, Any], code: int, version: str = "1.0.0") -> dict[str, Any]:
    rc, out = result
    assert rc == 1, out
    assert out["code"] == code, out
    assert out["cniVersion"] == version and out["msg"]
    return dict(out)


# ---------------------------------------------------------------------------------------------------
# VERSION and lean start-up


def test_version(env: Env) -> None:
    assert env.run("VERSION", b'{"cniVersion": "0.4.0"}') == (
        0,
        {"cniVersion": "0.4.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]},
    )
    rc, out = env.run("VERSION", b"")
    assert rc == 0 and out["cniVersion"] == "1.1.0"
    rc, out = env.run("VERSION", b'{"cniVersion": "1.2.0"}')  # the spec: the version asked for, echoed
    assert rc == 0 and out["cniVersion"] == "1.2.0" and "1.2.0" not in out["supportedVersions"]


def test_the_spec_error_codes_by_number(env: Env) -> None:
    env.pod("shop", "web")
    assert_error(env.run("ADD", env.conf(), CNI_IFNAME=""), 4)  # invalid necessary environment variables
    assert_error(env.run("ADD", env.conf(prev=None)), 7)  # invalid network config
    long_int = b'{"cniVersion": "1.0.0", "x": ' + b"1" * 5000 + b"}"  # longer than Python's int digit limit
    assert_error(env.run("ADD", long_int), 6, "1.1.0")  # failed to decode content (its version unreadable)


FORBIDDEN = ("grpc", "pyroute2", "iptc", "bcc", "yaml", "kubernetes", "click", "psutil", "google", "node_agent")


# Stdlib modules whose import costs a non-mesh ADD milliseconds of start-up (docs/cni-plugin.md, "Start-up
# cost"): json pulls in re, enum, functools and collections; typing, ipaddress, copy, base64, contextlib,
# weakref, subprocess, dataclasses, inspect, socket, ssl and urllib are only for the paths that need them.
HEAVY_STDLIB = (
    "json", "re", "enum", "functools", "collections", "typing", "ipaddress", "copy", "base64", "contextlib",
    "weakref", "subprocess", "dataclasses", "inspect", "socket", "ssl", "urllib", "shutil", "tempfile", "shlex",
    "threading", "selectors", "signal", "ctypes",
)  # fmt: skip


def _modules_after(env: Env, code: str) -> set[str]:
    """Modules a fresh `python -I -S` (like the installed launcher) has loaded after running ``code``."""
    wrapper = (
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "before = set(sys.modules)\n"
        f"{code}\n"
        "mods = sorted(set(sys.modules) - before)\n"
        "sys.stdout.write('\\n'.join(mods))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", wrapper], capture_output=True, text=True, env={}, check=True
    )
    return set(proc.stdout.split())


def test_only_stdlib_is_imported(env: Env) -> None:
    env.pod("shop", "web")
    conf = env.conf()
    code = (
        "import os\n"
        "from cni.plugin import entry as plugin\n"
        "environ = dict(os.environ, CNI_COMMAND='ADD', CNI_CONTAINERID='c1', CNI_IFNAME='eth0',"
        f" CNI_NETNS={env.netns!r}, CNI_ARGS='K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web')\n"
        f"rc, out = plugin.run(environ, {json.dumps(conf).encode()!r})\n"
        "rc2, _ = plugin.run(dict(os.environ, CNI_COMMAND='VERSION'), b'')\n"
        "assert rc + rc2 == 0, out\n"
    )
    mods = _modules_after(env, code)
    tops = {m.split(".")[0] for m in mods}
    assert not tops & set(FORBIDDEN)
    assert tops - set(sys.stdlib_module_names) - {"__main__"} == {"cni"}
    # a non-mesh ADD does not pay for the heavy stdlib modules or the sidecar/agent code
    assert not {"cni.contract.annotations", "cni.rules", "cni.plugin.agent_client", "cni.contract.spec"} & mods
    assert not set(HEAVY_STDLIB) & tops, sorted(set(HEAVY_STDLIB) & tops)


@pytest.mark.parametrize("ranges", [False, True])
def test_sidecar_path_imports_stay_lean(env: Env, ranges: bool) -> None:
    """What a sidecar ADD loads besides the non-mesh path: the annotation parser, the rule builder,
    netns_tables and its spawner, without `subprocess`, `dataclasses`, `typing`, `re`, `json` (each costs
    milliseconds); `ipaddress` only when the pod has range annotations."""
    annotations = {"traffic.sidecar.istio.io/excludeOutboundPorts": "5432"}
    if ranges:
        annotations["traffic.sidecar.istio.io/excludeOutboundIPRanges"] = "10.1.0.0/16,fd00::/64"
    code = (
        "from cni.contract.annotations import sidecar_params\n"
        "from cni.rules import builder\nfrom cni.kernel import flavour, spawn\n"
        "from cni.kernel import tables as netns_tables\n"
        f"spec = sidecar_params({annotations!r})\n"
        "text = builder.sidecar_rules(spec, 4).render() + builder.sidecar_rules(spec, 6).render()\n"
        "assert spawn.run_many([(['true'], None), (['cat'], text)], 10)[1].stdout == text\n"
    )
    mods = _modules_after(env, code)
    tops = {m.split(".")[0] for m in mods}
    heavy = set(HEAVY_STDLIB) - {"ipaddress", "functools", "collections"} if ranges else set(HEAVY_STDLIB)
    assert not heavy & tops, sorted(heavy & tops)
    assert "cni.contract.spec" not in mods


def test_in_process_create_imports_stay_lean(env: Env) -> None:
    """The standalone ADD's in-process create, nftables and iptables-nft (the batches built, a netns
    entered, netlink sockets) loads none of the heavy modules either: `_socket` and `_ctypes`, not
    `socket` and `ctypes`."""
    code = (
        "from cni.contract.annotations import sidecar_params\n"
        "from cni.kernel import nft_fresh, nft_tables\n"
        "from cni.kernel import netns\n"
        "from cni.rules import nft_batch, nft_builder\n"
        "spec = sidecar_params({'traffic.sidecar.istio.io/excludeOutboundPorts': '5432'})\n"
        "assert nft_batch.batch(nft_builder.sidecar_table(spec, (4, 6)))[1] > 1\n"
        "from cni.rules import builder, nft_compat_batch, xt_fresh_rules\n"
        "from cni.rules.transition import fresh_ruleset_text\n"
        "for family in (4, 6):\n"
        "    text = fresh_ruleset_text(builder.sidecar_rules(spec, family))\n"
        "    assert nft_compat_batch.changes(xt_fresh_rules.read_fresh(text, family))\n"
        "assert netns._setns_call() is not None\n"  # what setns calls (calling it needs root)
    )
    mods = _modules_after(env, code)
    tops = {m.split(".")[0] for m in mods}
    assert not set(HEAVY_STDLIB) & tops, sorted(set(HEAVY_STDLIB) & tops)


def test_importtime_of_version(env: Env) -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "from cni.plugin.launch import run_executable; run_executable()"],
        input=b"",
        env={"CNI_COMMAND": "VERSION", "PATH": os.environ["PATH"]},
        capture_output=True,
        check=True,
    )
    imported = [line.split("|")[-1].strip() for line in proc.stderr.decode().splitlines() if "|" in line]
    assert any(m == "cni.plugin" for m in imported)
    assert not {m.split(".")[0] for m in imported} & set(FORBIDDEN)


# ---------------------------------------------------------------------------------------------------
# ADD


def test_non_mesh_add_returns_prev_result_and_logs_json(env: Env) -> None:
    env.pod("shop", "web")
    rc, out = env.run("ADD", env.conf())
    assert rc == 0 and out == PREV_100
    lines = env.log_lines()
    assert lines and all(
        set(line) >= {"ts", "level", "msg", "step", "pod", "namespace", "netns", "container_id", "cmd"}
        for line in lines
    )
    assert lines[-1]["cmd"] == "ADD" and lines[-1]["pod"] == "web" and lines[-1]["namespace"] == "shop"
    assert any(line["step"] == "membership" and line["mode"] == "none" for line in lines)


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_add_converts_prev_result_to_requested_version(env: Env, version: str) -> None:
    env.pod("shop", "web")
    rc, out = env.run("ADD", env.conf(version=version))
    assert rc == 0 and out["cniVersion"] == version
    assert out["interfaces"] == PREV_100["interfaces"]
    if version.startswith("0."):
        assert out["ips"] == [{"version": "4", **PREV_100["ips"][0]}]
    else:
        assert out["ips"] == PREV_100["ips"]


def test_add_without_pod_object_or_identity_passes_through(env: Env) -> None:
    assert env.run("ADD", env.conf(), name="ghost")[0] == 0
    assert env.run("ADD", env.conf(), CNI_ARGS="")[0] == 0


def test_excluded_namespace_is_untouched_even_with_sidecar(env: Env) -> None:
    env.pod(
        "kube-system",
        "dns",
        annotations={"sidecar.istio.io/status": "{}", "traffic.sidecar.istio.io/excludeOutboundPorts": "bad"},
    )
    assert env.run("ADD", env.conf(), ns="kube-system", name="dns")[0] == 0


@pytest.mark.parametrize(
    ("stdin", "env_change", "code"),
    [
        (b"{not json", {}, 6),
        (b"", {}, 6),
        (None, {"CNI_COMMAND": ""}, 4),
        (None, {"CNI_IFNAME": ""}, 4),
        (None, {"CNI_NETNS": ""}, 4),
        (None, {"CNI_CONTAINERID": "bad id"}, 4),
        (None, {"CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=we b"}, 4),
        (None, {"CNI_NETNS": "/nonexistent/netns"}, 106),
        (None, {"CNI_NETNS": "/etc/hostname"}, 106),
        (None, {"CNI_NETNS": "/proc/self/ns/net"}, 106),  # the plugin's own netns: refused
        (None, {"CNI_NETNS": "/proc/1/ns/mnt"}, 106),  # a namespace, but not a network one
    ],
)
def test_add_bad_input(env: Env, stdin: bytes | None, env_change: dict[str, str], code: int) -> None:
    env.pod("shop", "web")
    result = env.run("ADD", stdin if stdin is not None else env.conf(), **env_change)
    version = "1.0.0" if stdin is None else "1.1.0"
    assert_error(result, code, version)


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"cniVersion": "0.2.0"}, 1),
        ({"cniVersion": "2.0.0"}, 1),
        ({"prevResult": None}, 7),
        ({"prevResult": {"ips": [{"address": "300.1.1.1/24"}]}}, 7),
        ({"objects_dir": 7}, 7),
        ({"backend": "magic"}, 7),
        ({"exclude_namespaces": [1]}, 7),
    ],
)
def test_add_bad_config(env: Env, change: dict[str, Any], code: int) -> None:
    env.pod("shop", "web")
    conf = env.conf()
    conf.update(change)
    conf = {k: v for k, v in conf.items() if v is not None}
    rc, out = env.run("ADD", conf)
    assert rc == 1 and out["code"] == code and out["msg"]


def test_invalid_annotation_fails_before_touching_anything(env: Env) -> None:
    env.pod(
        "shop",
        "web",
        annotations={
            "sidecar.istio.io/status": "{}",
            "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/8;reboot",
        },
    )
    out = assert_error(env.run("ADD", env.conf()), 101)
    assert "excludeOutboundIPRanges" in out["msg"] and "10.0.0.0/8;reboot" in out["msg"]
    assert not any(line["step"] == "redirect" for line in env.log_lines())


def test_pod_uid_mismatch_is_an_error(env: Env) -> None:
    env.pod("shop", "web", uid="other-uid")
    assert_error(env.run("ADD", env.conf()), 100)


def test_broken_objects_file_is_an_error(env: Env) -> None:
    (env.objects / "pod.json").write_text('{"kind": "Pod", "metadata": {"name": "web"')
    assert_error(env.run("ADD", env.conf()), 100)


# ---------------------------------------------------------------------------------------------------
# ambient / agent


def test_ambient_add_waits_for_the_agent(env: Env) -> None:
    env.namespace("shop", {"istio.io/dataplane-mode": "ambient"})
    env.pod("shop", "web")
    agent = FakeAgent(env.sock)
    try:
        rc, out = env.run("ADD", env.conf())
        assert rc == 0 and out == PREV_100
        assert [r["v"] for r in agent.requests] == [2, 1]  # a version-1 agent: the plugin asks again
        req = agent.requests[1]
        assert req["cmd"] == "ADD" and req["mode"] == "ambient" and req["netns"] == env.netns
        assert req["pod"] == {"namespace": "shop", "name": "web", "uid": "uid-1"}
        assert req["ips"] == ["10.7.0.5"] and req["container_id"] == "c0ffee" and req["ifname"] == "eth0"
    finally:
        agent.close()


def test_ambient_add_fails_closed_without_agent(env: Env) -> None:
    env.pod("shop", "web", labels={"istio.io/dataplane-mode": "ambient"})
    out = assert_error(env.run("ADD", env.conf()), 103)
    assert str(env.sock) in out["details"]


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (b'{"ok": false, "error": "proxy not connected", "retry": true}\n', 11),
        (b'{"ok": false, "error": "netns inode mismatch", "retry": false}\n', 104),
        (None, 103),
    ],
)
def test_ambient_add_agent_errors(env: Env, answer: bytes | None, code: int) -> None:
    env.pod("shop", "web", labels={"istio.io/dataplane-mode": "ambient"})
    agent = FakeAgent(env.sock, lambda r: answer)
    try:
        out = assert_error(env.run("ADD", env.conf()), code)
        if answer:
            assert json.loads(answer)["error"] in out["details"]
    finally:
        agent.close()


def test_ambient_add_timeout_is_bounded(env: Env) -> None:
    env.pod("shop", "web", labels={"istio.io/dataplane-mode": "ambient"})

    def slow(req: dict[str, Any]) -> bytes:
        time.sleep(3)
        return b'{"ok": true}\n'

    agent = FakeAgent(env.sock, slow)
    try:
        start = time.monotonic()
        assert_error(env.run("ADD", env.conf(agent_timeout=0.5)), 103)
        assert time.monotonic() - start < 2.5
    finally:
        agent.close()


def test_non_mesh_add_needs_no_agent(env: Env) -> None:
    env.pod("shop", "web", labels={"istio.io/dataplane-mode": "none"})
    env.namespace("shop", {"istio.io/dataplane-mode": "ambient"})
    assert env.run("ADD", env.conf())[0] == 0


def test_ebpf_backend_hands_sidecar_pods_to_the_agent(env: Env) -> None:
    env.pod("shop", "web", annotations={"sidecar.istio.io/status": "{}"})
    agent = FakeAgent(env.sock)
    try:
        assert env.run("ADD", env.conf(backend="ebpf"))[0] == 0
        assert agent.requests[-1]["mode"] == "sidecar"
    finally:
        agent.close()


def test_ambient_del_tells_agent_and_succeeds_without_it(env: Env) -> None:
    env.pod("shop", "web", labels={"istio.io/dataplane-mode": "ambient"})
    assert env.run("DEL", env.conf())[0] == 0  # agent down: still success
    assert any(line["level"] == "warning" and line["step"] == "agent" for line in env.log_lines())
    agent = FakeAgent(env.sock, lambda r: b'{"ok": true, "state": "removed"}\n')
    try:
        assert env.run("DEL", env.conf(prev=None), netns="")[0] == 0  # containerd: empty CNI_NETNS
        assert agent.requests[0]["cmd"] == "DEL" and agent.requests[0]["netns"] == ""
    finally:
        agent.close()


def test_ambient_check(env: Env) -> None:
    env.pod("shop", "web", labels={"istio.io/dataplane-mode": "ambient"})
    assert_error(env.run("CHECK", env.conf()), 103)
    agent = FakeAgent(env.sock, lambda r: b'{"ok": true, "state": "intact"}\n')
    try:
        assert env.run("CHECK", env.conf()) == (0, None)
        assert agent.requests[0]["cmd"] == "CHECK"
    finally:
        agent.close()
    agent = FakeAgent(env.sock, lambda r: b'{"ok": false, "error": "chain HEADRACE missing", "retry": false}\n')
    try:
        out = assert_error(env.run("CHECK", env.conf()), 105)
        assert "HEADRACE missing" in out["details"]
    finally:
        agent.close()


# ---------------------------------------------------------------------------------------------------
# DEL, CHECK, STATUS, GC without the kernel


def test_del_is_idempotent_for_gone_or_empty_netns(env: Env) -> None:
    env.pod("shop", "web")
    for netns in ("", "/nonexistent/netns"):
        assert env.run("DEL", env.conf(prev=None), netns=netns) == (0, None)
    assert env.run("DEL", env.conf(prev=None), name="ghost", netns="") == (0, None)


def test_del_succeeds_with_the_k8s_args_its_add_refused(env: Env) -> None:
    env.pod("shop", "web", annotations={"sidecar.istio.io/status": "{}"})
    podman3 = "IgnoreUnknown=1;K8S_POD_NAMESPACE=quirky_turing;K8S_POD_NAME=quirky_turing"
    assert_error(env.run("ADD", env.conf(), CNI_ARGS=podman3), 4)
    assert env.run("DEL", env.conf(prev=None), netns="", CNI_ARGS=podman3) == (0, None)


def test_del_of_a_sidecar_pod_with_unmounted_or_wrong_netns(env: Env) -> None:
    env.pod("shop", "web", annotations={"sidecar.istio.io/status": "{}"})
    pin = env.tmp / "pinned-netns"
    pin.write_text("")  # what a runtime's pin file is after the namespace was unmounted
    assert env.run("DEL", env.conf(prev=None), netns=str(pin)) == (0, None)
    # never the node's own netns, never a non-network namespace: refused before any iptables call
    assert_error(env.run("DEL", env.conf(prev=None), netns="/proc/self/ns/net"), 106)
    assert_error(env.run("DEL", env.conf(prev=None), netns="/proc/1/ns/mnt"), 106)
    assert not any(line["step"] in ("redirect", "remove") for line in env.log_lines())


def test_check_requires_prev_result(env: Env) -> None:
    env.pod("shop", "web")
    assert_error(env.run("CHECK", env.conf(prev=None)), 7)
    assert env.run("CHECK", env.conf()) == (0, None)


def test_status_and_gc(env: Env) -> None:
    assert env.run("STATUS", env.conf(version="1.1.0", prev=None)) == (0, None)
    assert_error(env.run("STATUS", env.conf(version="1.0.0", prev=None)), 1)
    out = assert_error(env.run("STATUS", env.conf(version="1.1.0", prev=None, objects_dir="/nonexistent")), 50, "1.1.0")
    assert "/nonexistent" in out["details"]
    out = assert_error(env.run("STATUS", env.conf(version="1.1.0", prev=None), PATH="/nonexistent"), 50, "1.1.0")
    assert "iptables tools missing" in out["details"]
    gc_conf = env.conf(
        version="1.1.0", prev=None, **{"cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}]}
    )
    assert env.run("GC", gc_conf) == (0, None)
    # libcni writes a network's empty attachment list as null
    assert env.run("GC", env.conf(version="1.1.0", prev=None, **{"cni.dev/valid-attachments": None})) == (0, None)
    assert_error(env.run("GC", env.conf(version="0.4.0", prev=None)), 1, "0.4.0")
    assert any(line["step"] == "gc" and line["valid_attachments"] == 1 for line in env.log_lines())


# ---------------------------------------------------------------------------------------------------
# Kubernetes API pod source


def test_kubernetes_source(env: Env) -> None:
    handler = make_handler()
    for url in serve(handler):
        kc = env.tmp / "kubeconfig"
        kc.write_text(
            json.dumps(
                {
                    "current-context": "c",
                    "contexts": [{"name": "c", "context": {"cluster": "k"}}],
                    "clusters": [{"name": "k", "cluster": {"server": url}}],
                }
            )
        )
        conf = env.conf(objects_dir=None, kubeconfig=str(kc))
        conf.pop("objects_dir")
        # the served pod is a sidecar pod with annotations: use the ebpf backend so the agent gets it
        agent = FakeAgent(env.sock)
        try:
            conf_ebpf = dict(conf, backend="ebpf")
            rc, _ = env.run(
                "ADD",
                conf_ebpf,
                name="web-0",
                K8S_ARGS_UNUSED="1",
                CNI_ARGS="K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0",
            )
            assert rc == 0 and agent.requests[-1]["pod"]["uid"].startswith("1111")
        finally:
            agent.close()
        # not found in the API is an error (the pod must exist when the runtime calls ADD)
        assert_error(env.run("ADD", conf, CNI_ARGS="K8S_POD_NAMESPACE=shop;K8S_POD_NAME=nope"), 100)
        assert ("/api/v1/namespaces/shop/pods/nope", None) in handler.seen
    # server gone: unreachable
    out = assert_error(env.run("ADD", conf, CNI_ARGS="K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0"), 100)
    assert "unreachable" in out["details"]


def test_del_tolerates_pod_source_problems(env: Env) -> None:
    env.pod("shop", "web", uid="a-newer-pod")  # stale: the object now belongs to another pod
    assert env.run("DEL", env.conf(prev=None), netns="") == (0, None)
    (env.objects / "broken.json").write_text('{"metadata": {"name": "web"')
    assert env.run("DEL", env.conf(prev=None), netns="") == (0, None)
    warnings = [line for line in env.log_lines() if line["level"] == "warning" and line["step"] == "pod-source"]
    assert len(warnings) == 2


def test_check_is_refused_for_0_3_x(env: Env) -> None:
    env.pod("shop", "web")
    rc, out = env.run("CHECK", env.conf(version="0.3.1"))
    assert rc != 0 and out["code"] == 1 and "0.4.0" in out["msg"]
