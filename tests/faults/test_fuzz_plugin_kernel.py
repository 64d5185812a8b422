"""Property-based fuzzing of the CNI plugin on the real kernel: never a half-applied netns.

(1) In-process (cni.plugin.entry.run) against a real pod netns with the real iptables-nft tools: a
sidecar pod with fuzzed traffic annotations (REDIRECT and TPROXY, valid and invalid), fuzzed prevResult
IPs (IPv4, IPv6, both, none), and a fault injected at a random command of a random batch (the command
"fails" without running, the others of its batch run). After each ADD the netns is either complete (the
plugin's own CHECK, run without faults, passes) or exactly as before (no rule of ours in either iptables
flavour or family, no policy-routing rule or route of ours); DEL then leaves it clean again.
(2) The installed `headrace-cni` executable as a subprocess with fuzzed stdin and environment: stderr
stays empty (never a traceback) and stdout holds one CNI result or error object.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni.kernel import spawn
from cni.plugin import entry
from tests.faults.plugin_checks import check_answer
from tests.faults.plugin_inputs import (
    ANNOTATION_KEYS,
    FUZZ,
    SIDECAR_STATUS,
    annotation_value,
    base_conf,
    environments,
    mutate_stdin,
    stdin_bytes,
    write_objects,
)

pytestmark = [pytest.mark.faults, pytest.mark.kernel]

KERNEL_EXAMPLES = 80
SUBPROCESS_EXAMPLES = 40
PLUGIN = str(Path(sys.executable).parent / "headrace-cni")
ENV_OK = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_UID=uid-1"


class FaultyRunner:
    """The real spawner, except that one job of one batch fails without running."""

    def __init__(self, fail_batch: int | None, fail_job: int) -> None:
        self.fail_batch = fail_batch
        self.fail_job = fail_job
        self.batch = -1
        self.injected = False
        self.real = spawn.Spawner()

    def run_many(self, jobs: Sequence[tuple[Sequence[str], str | None]], timeout: float) -> list[spawn.Result]:
        self.batch += 1
        if self.batch != self.fail_batch:
            return self.real.run_many(jobs, timeout)
        bad = self.fail_job % len(jobs)
        self.injected = True
        others = [job for i, job in enumerate(jobs) if i != bad]
        ran = iter(self.real.run_many(others, timeout) if others else [])
        return [spawn.Result(1, "", "injected failure") if i == bad else next(ran) for i in range(len(jobs))]


def our_state(netns: str) -> list[str]:
    """Everything of ours in the netns: iptables lines in both flavours and families, TPROXY routing."""
    enter = ["nsenter", f"--net={netns}"]
    saves = [([*enter, tool], None) for tool in
             ("iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save")]
    rules = [([*enter, "ip", fam, "rule", "show"], None) for fam in ("-4", "-6")]
    routes = [([*enter, "ip", fam, "route", "show", "table", "133"], None) for fam in ("-4", "-6")]
    results = spawn.Spawner().run_many([*saves, *rules, *routes], 30)
    out: list[str] = []
    for i, res in enumerate(results):
        for line in res.stdout.splitlines():
            ours = ("HEADRACE" in line if i < 4 else "0x539" in line or "lookup 133" in line if i < 6
                    else bool(line.strip()))
            if ours:
                out.append(line)
    return out


class Pod:
    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="hr-fuzzk-"))
        (self.tmp / "objects").mkdir()
        self.holder = subprocess.Popen(["unshare", "--net", "sleep", "900"])
        self.netns = f"/proc/{self.holder.pid}/ns/net"
        for _ in range(300):
            if os.path.exists(self.netns) and os.stat(self.netns).st_ino != os.stat("/proc/self/ns/net").st_ino:
                break
            subprocess.run(["sleep", "0.01"], check=True)
        subprocess.run(["nsenter", f"--net={self.netns}", "ip", "link", "set", "lo", "up"], check=True)

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()
        subprocess.run(["rm", "-rf", str(self.tmp)], check=False)


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    p = Pod()
    try:
        yield p
    finally:
        p.close()


def run_plugin(command: str, netns: str, conf: dict[str, Any]) -> tuple[int, str]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c0ffee", "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
           "CNI_PATH": "/usr/lib/cni", "CNI_ARGS": ENV_OK}
    return entry.run(env, json.dumps(conf).encode())


V4 = {"interface": 0, "address": "10.7.0.5/24", "gateway": "10.7.0.1"}
V6 = {"interface": 0, "address": "fd00:7::5/64"}


def test_fuzz_add_never_half_applied(pod: Pod) -> None:
    tally = {"cases": 0, "applied": 0, "refused": 0, "faults_injected": 0}
    assert our_state(pod.netns) == []

    @settings(FUZZ, max_examples=KERNEL_EXAMPLES)
    @given(
        annotations=st.one_of(st.just({}), st.just({}),
                              st.dictionaries(st.sampled_from(ANNOTATION_KEYS), annotation_value, max_size=3)),
        tproxy=st.booleans(),
        ips=st.sampled_from([[V4], [V6], [V4, V6], []]),
        fail_batch=st.sampled_from([None, 0, 0, 0, 1]),
        fail_job=st.integers(0, 5),
    )
    def case(annotations: dict[str, str], tproxy: bool, ips: list[Any], fail_batch: int | None,
             fail_job: int) -> None:
        ann = {**SIDECAR_STATUS, **annotations}
        if tproxy:
            ann["sidecar.istio.io/interceptionMode"] = "TPROXY"
        write_objects(pod.tmp / "objects", {"labels": {}, "annotations": ann, "host_network": False,
                                            "namespace_labels": {}, "uid": "uid-1"})
        conf = base_conf(pod.tmp, "1.0.0", ips)
        faulty = FaultyRunner(fail_batch, fail_job)
        previous = spawn.install_runner(faulty)
        try:
            status, text = run_plugin("ADD", pod.netns, conf)
        finally:
            spawn.install_runner(previous)
        out = check_answer(status, text, "ADD")
        tally["cases"] += 1
        tally["faults_injected"] += faulty.injected
        if status == 0:
            tally["applied"] += 1
            check_status, check_text = run_plugin("CHECK", pod.netns, conf)
            assert check_status == 0, f"ADD succeeded but the redirect is not complete: {check_text}"
        else:
            assert out is not None
            tally["refused"] += 1
            assert our_state(pod.netns) == [], f"failed ADD ({out}) left state behind"
        del_status, del_text = run_plugin("DEL", pod.netns, conf)
        assert del_status == 0, del_text
        assert our_state(pod.netns) == [], "DEL left state behind"

    case()
    print(f"\nplugin on the kernel: {json.dumps(tally)}")
    assert tally["faults_injected"] >= 15 and tally["applied"] >= 10 and tally["refused"] >= 10


def test_fuzz_plugin_subprocess_never_a_traceback(pod: Pod) -> None:
    netns = {"pod": pod.netns, "own": "/proc/self/ns/net", "regular": str(pod.tmp / "objects"),
             "missing": str(pod.tmp / "nope"), "empty": ""}
    tally = {"cases": 0}

    @settings(FUZZ, max_examples=SUBPROCESS_EXAMPLES)
    @given(data=st.data(), seed=st.integers(0, 2**32))
    def case(data: st.DataObject, seed: int) -> None:
        env = data.draw(environments(netns))
        stdin = data.draw(stdin_bytes(pod.tmp))
        if seed % 2:
            stdin = mutate_stdin(random.Random(seed), stdin, bend_bytes=False)  # log_file stays ours
        write_objects(pod.tmp / "objects", {"labels": {}, "annotations": {}, "host_network": False,
                                            "namespace_labels": {"istio.io/dataplane-mode": "ambient"},
                                            "uid": "uid-1"})
        env = {k: v.replace("\0", "") for k, v in env.items()}
        env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
        env["HEADRACE_CNI_LOG_FILE"] = str(pod.tmp / "cni.log")
        proc = subprocess.run([PLUGIN], input=stdin, env=env, capture_output=True, timeout=60)
        assert proc.stderr == b"", proc.stderr.decode(errors="replace")
        check_answer(proc.returncode, proc.stdout.decode(), env.get("CNI_COMMAND"))
        tally["cases"] += 1

    case()
    print(f"\nplugin as a subprocess: {json.dumps(tally)}")
    assert our_state(pod.netns) == []
