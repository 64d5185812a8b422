"""Dry-run golden files of the plugin's whole ADD path: netconf + pod object + CNI env -> what it would run.

Each scenario feeds `cni.plugin.entry.run` a conflist entry (with prevResult), a pod (and namespace) object
in an objects dir and the CNI environment, like a runtime does; every command the kernel layer starts is
captured by a recording `spawn.Runner` (installed through `spawn.install_runner`) instead of being run,
and answered with success; so is the nftables table the plugin creates in-process (`nft_fresh`). The
golden file holds the exact argv and stdin texts per batch of commands started together
(iptables-restore under nsenter, `ip -batch` lines, ...) or, for pods the agent handles, the request sent
to the (fake) agent. This pins annotation parsing -> spec -> rules -> commands; the
builder's own golden files (tests/golden/iptables) start from a spec.

The pod netns is a real, empty one (the plugin validates it before anything else), written `$NETNS`.
Regenerate after an intended change with `HEADRACE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest
tests/unit/test_cni_add_dry_run.py` and review the diff.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from cni.kernel import apply, nft_fresh, spawn
from cni.plugin import entry
from cni.rules import nft_text
from cni.rules.nft_text import NftTable
from tests.unit.golden import assert_golden
from tests.unit.test_cni_agent_client import FakeAgent
from tests.unit.test_cni_plugin_process import pod_netns

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "golden" / "add"
SIDECAR_STATUS = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}
V4 = {"address": "10.7.0.5/24", "gateway": "10.7.0.1"}
V6 = {"address": "fd00:7::5/64", "gateway": "fd00:7::1"}


class Scenario(NamedTuple):
    annotations: dict[str, str] | None = SIDECAR_STATUS  # None: no pod annotations at all
    labels: dict[str, str] | None = None
    namespace: str = "shop"
    namespace_labels: dict[str, str] | None = None
    ips: tuple[dict[str, str], ...] = (V4, V6)
    conf: dict[str, Any] | None = None  # netconf fields besides the defaults below


def _sidecar(annotations: dict[str, str], **kw: Any) -> Scenario:
    return Scenario(annotations={**SIDECAR_STATUS, **annotations}, **kw)


SCENARIOS: dict[str, Scenario] = {
    "sidecar_dual_stack": Scenario(),
    "sidecar_ipv4_only": Scenario(ips=(V4,)),
    "sidecar_ipv6_only": Scenario(ips=(V6,)),
    "sidecar_exclusions": _sidecar(
        {
            "traffic.sidecar.istio.io/excludeInboundPorts": "22, 9000",
            "traffic.sidecar.istio.io/excludeOutboundPorts": "5432,6379",
            "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.0/12,192.168.0.0/16,fd00:10:96::/112",
        }
    ),
    "sidecar_include_inbound_ports": _sidecar({"traffic.sidecar.istio.io/includeInboundPorts": "80,8080"}),
    "sidecar_include_outbound_ranges": _sidecar(
        {
            "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/8,fd00::/8",
            "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.1.0.0/16",
        }
    ),
    "sidecar_tproxy": _sidecar({"sidecar.istio.io/interceptionMode": "TPROXY"}),
    "sidecar_tproxy_ipv4_only": _sidecar({"sidecar.istio.io/interceptionMode": "TPROXY"}, ips=(V4,)),
    "sidecar_iptables_legacy": Scenario(conf={"iptables": "legacy"}),
    "sidecar_nftables": Scenario(conf={"backend": "nftables"}),
    "sidecar_nftables_tproxy_ipv4_only": _sidecar(
        {"sidecar.istio.io/interceptionMode": "TPROXY"}, ips=(V4,), conf={"backend": "nftables"}
    ),
    "sidecar_include_outbound_ports": _sidecar(
        {
            "traffic.sidecar.istio.io/includeOutboundPorts": "31000, 32000",
            "traffic.sidecar.istio.io/includeOutboundIPRanges": "",
        },
        ips=(V4,),
    ),
    "sidecar_interfaces": _sidecar(
        {
            "traffic.sidecar.istio.io/excludeInterfaces": "net1",
            "traffic.sidecar.istio.io/kubevirtInterfaces": "eth1,eth2",
        },
        ips=(V4,),
    ),
    "sidecar_interception_none": _sidecar({"sidecar.istio.io/interceptionMode": "NONE"}),
    "non_mesh_pod": Scenario(annotations=None),
    "excluded_namespace": Scenario(namespace="batch", conf={"exclude_namespaces": ["kube-system", "batch"]}),
    "ambient_pod": Scenario(annotations=None, namespace_labels={"istio.io/dataplane-mode": "ambient"}),
}


class Recorder:
    """A `spawn.Runner` that records each batch (argv, stdin) and answers every command with success
    and no output: what the plugin would run into a fresh pod netns."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[list[str], str | None]]] = []

    def run_many(self, jobs: Sequence[tuple[Sequence[str], str | None]], timeout: float) -> list[spawn.Result]:
        self.batches.append([(list(argv), stdin) for argv, stdin in jobs])
        return [spawn.Result(0, "", "") for _ in jobs]


IN_PROCESS = "in-process"  # a recorded batch standing for the nftables table created without a command


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    rec = Recorder()

    def created(_netns_path: str, table: NftTable, loopback_v6: bool, _step: str) -> None:
        rec.batches.append([([IN_PROCESS, *(["::6 on lo"] if loopback_v6 else [])], nft_text.create_text(table))])

    def created_xt(_netns_path: str, texts: Mapping[int, str], loopback_v6: bool, _step: str) -> None:
        rec.batches.append([([IN_PROCESS, f"IPv{family} restore text", *(["::6 on lo"] if loopback_v6 else [])], text)
                            for family, text in texts.items()])

    monkeypatch.setattr(nft_fresh, "create_fresh", created)
    monkeypatch.setattr(nft_fresh, "create_fresh_xt", created_xt)
    monkeypatch.setattr(apply, "on_path", lambda _name: True)  # the same text whatever this host has
    previous = spawn.install_runner(rec)
    try:
        yield rec
    finally:
        spawn.install_runner(previous)


def _write_objects(objects: Path, name: str, sc: Scenario) -> None:
    ns: dict[str, Any] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": sc.namespace}}
    if sc.namespace_labels:
        ns["metadata"]["labels"] = sc.namespace_labels
    meta: dict[str, Any] = {"name": name, "namespace": sc.namespace, "uid": f"uid-{name}"}
    if sc.labels:
        meta["labels"] = sc.labels
    if sc.annotations:
        meta["annotations"] = sc.annotations
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": [{"name": "app"}]}}
    (objects / f"ns-{sc.namespace}.json").write_text(json.dumps(ns))
    (objects / f"pod-{name}.json").write_text(json.dumps(pod))


def _netconf(tmp: Path, sc: Scenario) -> dict[str, Any]:
    prev = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:01", "sandbox": "/var/run/netns/pod"}],
        "ips": [{"interface": 0, **ip} for ip in sc.ips],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    }
    conf: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "headrace-cni",
        "iptables": "nft",
        "objects_dir": str(tmp / "objects"),
        "log_file": str(tmp / "cni.log"),
        "agent_socket": str(tmp / "agent.sock"),
        "agent_timeout": 5,
    }
    conf.update(sc.conf or {})
    conf["prevResult"] = prev
    return conf


def _shell(argv: list[str], stdin: str | None) -> list[str]:
    line = shlex.join(argv)
    if stdin is None:
        return [line]
    return [f"{line} <<'EOF'", *stdin.splitlines(), "EOF"]


def render(
    name: str,
    sc: Scenario,
    status: int,
    batches: list[list[tuple[list[str], str | None]]],
    requests: list[dict[str, Any]],
) -> str:
    """The golden text: the inputs in short, the exit status, then the commands (or the agent request)."""
    out = [f"# headrace-cni ADD, dry run: {name}"]
    conf = dict(sc.conf or {})
    out.append(f"# netconf: iptables={conf.pop('iptables', 'nft')}" + "".join(f", {k}={v}" for k, v in conf.items()))
    out.append(f"# pod {sc.namespace}/web, IPs: {', '.join(ip['address'] for ip in sc.ips)}")
    for what, values in (
        ("annotation", sc.annotations),
        ("label", sc.labels),
        ("namespace label", sc.namespace_labels),
    ):
        out.extend(f"#   {what} {k}: {v}" for k, v in sorted((values or {}).items()))
    out.append(f"# exit status {status}")
    if not batches and not requests:
        out.append("# nothing run, nothing sent")
    for number, batch in enumerate(batches, 1):
        if batch[0][0][0] == IN_PROCESS:  # nft_fresh: the tables as one nf_tables batch built in-process
            out.append(f"# batch {number}: no command, the plugin itself: one nf_tables batch of these texts")
            for argv, stdin in batch:
                out.append("# " + ", ".join(argv[1:]) if argv[1:] else "#")
                out.extend((stdin or "").splitlines())
            continue
        out.append(f"# batch {number}: {len(batch)} command(s) started together")
        for argv, stdin in batch:
            out.extend(_shell(argv, stdin))
    for request in requests:
        out.append("# request to the agent")
        out.extend(json.dumps(request, indent=2, sort_keys=True).splitlines())
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_add_dry_run(name: str, tmp_path: Path, pod_netns: str, recorder: Recorder) -> None:
    sc = SCENARIOS[name]
    (tmp_path / "objects").mkdir()
    _write_objects(tmp_path / "objects", "web", sc)
    conf = _netconf(tmp_path, sc)
    environ = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": pod_netns,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={sc.namespace};K8S_POD_NAME=web;K8S_POD_UID=uid-web",
    }
    agent = FakeAgent(tmp_path / "agent.sock")
    try:
        status, stdout = entry.run(environ, json.dumps(conf).encode())
    finally:
        agent.close()
    assert status == 0, stdout
    assert json.loads(stdout)["ips"] == conf["prevResult"]["ips"]  # the chained result passes through
    text = render(name, sc, status, recorder.batches, agent.requests).replace(pod_netns, "$NETNS")
    assert_golden(GOLDEN_DIR / f"{name}.golden", text)


def test_no_stale_golden_files() -> None:
    on_disk = {p.stem for p in GOLDEN_DIR.glob("*.golden")}
    assert on_disk <= set(SCENARIOS), f"golden files without a scenario: {sorted(on_disk - set(SCENARIOS))}"


def test_runner_is_put_back(recorder: Recorder) -> None:
    """The seam: the recorder sees what the kernel layer runs; install_runner(None) is the real spawner."""
    assert spawn.run_many([(["true"], None)], 5)[0].returncode == 0
    assert recorder.batches == [[(["true"], None)]]
    previous = spawn.install_runner(None)
    try:
        assert spawn.run_many([(["sh", "-c", "exit 3"], None)], 5)[0].returncode == 3
    finally:
        spawn.install_runner(previous)
    assert len(recorder.batches) == 1


__all__ = ["pod_netns"]  # the fixture, shared with the plugin process tests
