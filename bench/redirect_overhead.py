"""Redirect overhead: (a) no redirection vs (b) iptables vs (c) eBPF vs (d) nftables, side by side in one run.

    .venv/bin/python bench/redirect_overhead.py [--rounds 5] [--requests 2000] [--connections 500]
        [--size 64] [--spec sidecar|sidecar-outbound] [--conntrack fresh|always] [--cpus auto|none|N,..] [--rotate]
        [--settle 0.2] [--phase-limit 20] [--modes direct,iptables,nftables,ebpf[,nft-tproxy-out,nft-hooks]]
        [--json FILE]

Root only. A simulated node (node_agent.lab.SimNode, its own netns and bridge, plain pods: headrace=None)
gets two pods made by the real bridge + host-local plugins: `client` and `server`. The client pod also
gets a cgroup v2 directory of its own (/sys/fs/cgroup/unified/headrace-bench-<random>), which the eBPF
backend attaches to. Three long-lived processes (bench/redirect_workers.py) run for the whole benchmark:
- an echo server in the server pod (port 8080);
- the proxy in the client pod, in its cgroup, as uid 1337 (the sidecar proxy uid, bypassed by both
  backends) on 0.0.0.0:15001: getsockopt(SO_ORIGINAL_DST) per connection, a fixed upstream
  (server:8080) when there is none, then a byte relay;
- the client in the client pod, in its cgroup: per phase one connection with N sequential
  request/response round trips (latency) and M cycles of connect + 1 request/response + close (rate).
All three are pinned to one CPU by default (--cpus auto: the highest one), which steadies the figures.
Modes: (a) `direct`: no redirect rules; the client dials 127.0.0.1:15001. (b) `iptables`: IptablesBackend
(host flavour) applies SidecarSpec to the client pod; the client dials server:8080. (c) `ebpf`: EbpfBackend,
same spec, same pod. (d) `nftables`: NftablesBackend (one `table inet headrace`, same spec, same pod; removal
deletes the whole table, so no hook is left behind). Two reference modes, not backends of headrace, bound
what any netfilter capture can reach (bench/redirect_reference.py): (r1) `nft-tproxy-out`, outbound capture
by mark, policy route and `tproxy` (no conntrack, no NAT; the proxy's listener is transparent and takes the
original destination from its socket's address), and (r2) `nft-hooks`, the base chains such a capture
needs, capturing nothing (the client dials the proxy). Rounds interleave the modes (a,b,c,a,b,c,…); each phase
applies its backend, checks with the proxy's counters that every connection went through the proxy the
expected way (original destination in (b)/(c), the fixed upstream in (a)), measures, removes the backend.
A warm-up phase per mode (not recorded) comes first (it also compiles the eBPF object, once). Every phase
starts from the same client netns: iptables-nft leaves empty `nat` base chains behind when our rules are
removed, which keep conntrack on in the netns; by default (`--conntrack fresh`) the bench deletes those
empty tables after each iptables phase, `--conntrack always` keeps them so conntrack runs in every mode
(see docs/bench.md). The client netns gets net.ipv4.tcp_tw_reuse=1 (thousands of TIME_WAIT sockets).
Prints the table (p50/p90/p99 µs of one round trip, conn/s, cost ratio to (a)) and a verdict per figure.
Everything (processes, rules, programs, pins, bpffs, cgroup, pods, netns, files) is removed on exit,
Ctrl-C and SIGTERM included. Only addresses inside the netns made here (and loopback) carry traffic.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node_agent.backends.base import BackendError, PodTarget, RedirectSpec
from node_agent.lab.netns import NetNS, run_in
from node_agent.lab.simnode import Pod, SimNode

from bench.interrupts import stop_like_ctrl_c, uninterrupted
from bench.redirect_reference import DIALS_PROXY, REFERENCE_MODES, Redirector, ReferenceRules
from bench.redirect_stats import (
    ALL_MODES,
    DEFAULT_MODES,
    MODE_LABELS,
    NFT_VERDICT_HEADER,
    RESULT_HEADER,
    VERDICT_HEADER,
    ModeSamples,
    interleaved_schedule,
    nft_verdict_rows,
    percentile,
    rate_per_second,
    render_table,
    result_rows,
    summarise,
    verdict_rows,
)
from cni.contract.constants import PROXY_UID
from cni.contract.spec import SidecarSpec

WORKERS = Path(__file__).resolve().parent / "redirect_workers.py"
CGROUP2_ROOT = Path("/sys/fs/cgroup/unified")
PROXY_PORT = 15001
SERVER_PORT = 8080
START_TIMEOUT_S = 10.0
WARMUP_REQUESTS = 200
WARMUP_CONNECTIONS = 50


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# -- worker processes --------------------------------------------------------------------------------------


@dataclass
class Worker:
    """One bench/redirect_workers.py process inside a netns, driven over its stdin/stdout."""

    name: str
    proc: subprocess.Popen[str]

    @classmethod
    def start(cls, name: str, netns: NetNS, args: list[str]) -> Worker:
        cmd = ["nsenter", f"--net={netns.path}", "--", sys.executable, "-I", str(WORKERS), *args]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
        )
        w = cls(name, proc)
        try:
            first = w.read_line(START_TIMEOUT_S)
            if first != "ready":
                raise BenchError(f"{name} did not start: {first!r} {w.stderr_tail()}")
        except BaseException:
            w.stop()
            raise
        return w

    def read_line(self, timeout: float) -> str:
        out = self.proc.stdout
        assert out is not None
        ready, _, _ = select.select([out], [], [], timeout)
        if not ready:
            raise BenchError(f"{self.name}: no answer within {timeout:.0f} s")
        line = out.readline()
        if not line:
            raise BenchError(f"{self.name} exited: {self.stderr_tail()}")
        return line.strip()

    def ask(self, request: str, timeout: float) -> dict[str, Any]:
        inp = self.proc.stdin
        assert inp is not None
        inp.write(request + "\n")
        inp.flush()
        reply: dict[str, Any] = json.loads(self.read_line(timeout))
        return reply

    def stderr_tail(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


# -- set-up and teardown -----------------------------------------------------------------------------------


@dataclass
class Bench:
    root: Path
    cleanups: list[tuple[str, Callable[[], None]]] = field(default_factory=list)

    def on_exit(self, what: str, fn: Callable[[], None]) -> None:
        self.cleanups.append((what, fn))

    def close(self) -> None:
        while self.cleanups:
            what, fn = self.cleanups.pop()
            try:
                fn()
            except Exception as e:
                log(f"cleanup of {what} failed: {e}")


def make_cgroup() -> Path:
    if not (CGROUP2_ROOT / "cgroup.procs").exists():
        raise BenchError(f"no cgroup v2 hierarchy at {CGROUP2_ROOT}")
    path = CGROUP2_ROOT / f"headrace-bench-{secrets.token_hex(4)}"
    path.mkdir()
    return path


def remove_cgroup(path: Path) -> None:
    """Kill what is left in our cgroup (only processes this bench started) and remove it."""
    for _ in range(50):
        if not path.exists():
            return
        with contextlib.suppress(FileNotFoundError):
            for pid in (path / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.1)
    path.rmdir()


def pod_target(pod: Pod, cgroup: Path) -> PodTarget:
    return PodTarget(
        uid=pod.uid,
        namespace=pod.namespace,
        name=pod.name,
        netns_path=pod.netns.path,
        netns_inode=pod.netns.inode(),
        ips=tuple(str(e["address"]) for e in pod.result.get("ips", [])),
        cgroup_path=str(cgroup),
    )


def spec_of(name: str) -> SidecarSpec:
    if name == "sidecar":
        return SidecarSpec()
    if name == "sidecar-outbound":
        return SidecarSpec(include_inbound_ports=())
    raise BenchError(f"unknown spec {name!r}")


def drop_empty_nat_tables(netns_path: str) -> None:
    """iptables-nft leaves the `nat` base chains (empty) in the client netns after our rules are removed;
    they keep conntrack and NAT hooks on in that netns. Delete those tables when they hold no rule at all,
    so every phase starts from a netns without them (as a pod that never had iptables rules)."""
    res = run_in(netns_path, ["nft", "-j", "list", "ruleset"], check=False)
    if res.returncode != 0:
        return  # no nft binary or legacy tables: nothing to drop (see docs/bench.md)
    items = [next(iter(obj.items())) for obj in json.loads(res.stdout).get("nftables", [])]
    tables = {(o["family"], o["name"]) for kind, o in items if kind == "table"}
    busy = {(o["family"], o["table"]) for kind, o in items if kind == "rule"}
    for family, name in sorted(tables):
        if name == "nat" and family in ("ip", "ip6") and (family, name) not in busy:
            run_in(netns_path, ["nft", "delete", "table", family, name])


# -- one phase ---------------------------------------------------------------------------------------------


@dataclass
class Rig:
    client: Worker
    proxy: Worker
    server_ip: str
    backends: dict[str, Redirector | None]
    target: PodTarget
    spec: RedirectSpec
    size: int
    phase_limit: float
    settle: float
    conntrack: str

    def dial(self, mode: str) -> tuple[str, int]:
        return ("127.0.0.1", PROXY_PORT) if mode in DIALS_PROXY else (self.server_ip, SERVER_PORT)

    @contextlib.contextmanager
    def redirect(self, mode: str) -> Iterator[None]:
        backend = self.backends[mode]
        try:
            if backend is not None:
                backend.apply(self.target, self.spec)
            time.sleep(self.settle)  # same pause in every mode before measuring
            yield
        finally:
            if backend is not None:
                backend.remove(self.target)
                if mode == "iptables" and self.conntrack == "fresh":
                    drop_empty_nat_tables(self.target.netns_path)

    def client_op(self, **req: Any) -> dict[str, Any]:
        reply = self.client.ask(json.dumps(req), self.phase_limit + 15)
        if not reply.get("ok"):
            raise BenchError(f"client {req['op']} failed: {reply.get('error')}")
        return reply

    def phase(self, mode: str, requests: int, connections: int) -> tuple[list[int], list[int], int]:
        """Apply the mode, measure, remove; verify from the proxy's counters that every connection went
        through the proxy the way the mode means. Returns (rtt_ns, cycle_ns, elapsed_ns of the cycles)."""
        host, port = self.dial(mode)
        with self.redirect(mode):
            before = self.proxy.ask("stats", 5)
            lat = self.client_op(op="latency", host=host, port=port, n=requests, size=self.size,
                                 limit_s=self.phase_limit / 2)  # fmt: skip
            cyc = self.client_op(op="connect", host=host, port=port, m=connections, size=self.size,
                                 limit_s=self.phase_limit / 2)  # fmt: skip
            after = self.proxy.ask("stats", 5)
        rtt, cycles = list(lat["rtt_ns"]), list(cyc["cycle_ns"])
        expect = 1 + len(cycles)
        delta = {k: int(after[k]) - int(before[k]) for k in ("accepted", "via_orig", "via_fixed", "failed")}
        want_key = "via_fixed" if mode in DIALS_PROXY else "via_orig"
        if delta["accepted"] != expect or delta[want_key] != expect or delta["failed"]:
            raise BenchError(
                f"mode {mode}: expected all {expect} connections through the proxy by {want_key}, proxy saw {delta}"
            )
        if mode not in DIALS_PROXY and after["last_orig"] != f"{self.server_ip}:{SERVER_PORT}":
            raise BenchError(f"mode {mode}: proxy got original destination {after['last_orig']!r}")
        return rtt, cycles, int(cyc["elapsed_ns"])


# -- main --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="redirect overhead: direct vs iptables vs eBPF")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (a,b,c per round)")
    p.add_argument("--requests", type=int, default=2000, help="round trips per phase on one connection")
    p.add_argument("--connections", type=int, default=500, help="connect+request+close cycles per phase")
    p.add_argument("--size", type=int, default=64, help="request and response size in bytes")
    p.add_argument("--spec", choices=("sidecar", "sidecar-outbound"), default="sidecar",
                   help="SidecarSpec() or SidecarSpec(include_inbound_ports=()) for the client pod")  # fmt: skip
    p.add_argument("--rotate", action="store_true", help="rotate the first mode each round (a,b,c,b,c,a,…)")
    p.add_argument("--phase-limit", type=float, default=20.0, help="seconds a phase may take at most")
    p.add_argument("--settle", type=float, default=0.2, help="pause (s) after each mode's set-up, every mode")
    p.add_argument("--conntrack", choices=("fresh", "always"), default="fresh",
                   help="fresh: drop the empty nat tables iptables-nft leaves after each iptables phase; "
                   "always: keep them, so conntrack runs in the client netns in every mode")  # fmt: skip
    p.add_argument("--cpus", default="auto",
                   help="pin server, proxy and client to these CPUs (e.g. 1 or 0,1); auto: the highest CPU "
                   "available; none: no pinning")  # fmt: skip
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help=f"subset of {','.join(ALL_MODES)} (the last two: reference modes, not backends)")
    p.add_argument("--json", type=Path, help="also write the summaries as JSON here")
    a = p.parse_args(argv)
    for name in ("rounds", "requests", "connections", "size"):
        value = getattr(a, name)
        if not 1 <= value <= 1_000_000:
            p.error(f"--{name} must be within 1..1000000")
    if not 0 <= a.settle <= 10:
        p.error("--settle must be within 0..10 s")
    if not 0.5 <= a.phase_limit <= 600:
        p.error("--phase-limit must be within 0.5..600 s")
    if a.cpus == "auto":
        a.cpus = str(max(os.sched_getaffinity(0)))
    elif a.cpus == "none":
        a.cpus = ""
    if a.cpus:
        try:
            cpus = {int(c) for c in a.cpus.split(",")}
        except ValueError:
            p.error("--cpus takes comma-separated CPU numbers")
        if not cpus <= os.sched_getaffinity(0):
            p.error(f"--cpus must be a subset of the CPUs available here: {sorted(os.sched_getaffinity(0))}")
    modes = tuple(m for m in a.modes.split(",") if m)
    if not modes or any(m not in ALL_MODES for m in modes) or len(set(modes)) != len(modes):
        p.error(f"--modes takes a subset of {','.join(ALL_MODES)}")
    a.modes = modes
    return a


def make_backends(modes: tuple[str, ...], state: Path) -> dict[str, Redirector | None]:
    from node_agent.backends.iptables.backend import IptablesBackend

    out: dict[str, Redirector | None] = {"direct": None}
    if "iptables" in modes:
        out["iptables"] = IptablesBackend("auto")
    if "nftables" in modes:
        from node_agent.backends.nftables.backend import NftablesBackend

        out["nftables"] = NftablesBackend()
    for mode in REFERENCE_MODES:
        if mode in modes:
            out[mode] = ReferenceRules(mode, PROXY_PORT)
    if "ebpf" in modes:
        from node_agent.backends.ebpf.backend import EbpfBackend

        out["ebpf"] = EbpfBackend(state)
    return out


def environment_line(backends: dict[str, Redirector | None]) -> str:
    from node_agent.backends.iptables.backend import IptablesBackend

    ipt = backends.get("iptables")
    flavour = ipt.flavour if isinstance(ipt, IptablesBackend) else "-"
    return f"kernel {platform.release()}, {os.cpu_count()} CPUs, python {platform.python_version()}, iptables {flavour}"


def remover(backend: Redirector, target: PodTarget) -> Callable[[], None]:
    return lambda: backend.remove(target)


def unmount_if_mounted(state: Path) -> None:
    from node_agent.backends.ebpf import pinning

    if pinning.mount_fstype(state / "bpf") == "bpf":
        pinning.unmount_bpffs(state)


def run(a: argparse.Namespace, bench: Bench) -> dict[str, ModeSamples]:
    node = SimNode.create(bench.root / "node", headrace=None)
    bench.on_exit("simulated node", node.close)
    client_pod = node.add_pod("bench", "client")
    server_pod = node.add_pod("bench", "server")
    # Every connection leaves a TIME_WAIT socket in the client pod (client and proxy close first); without
    # reuse, connect() slows down badly once the even half of the port range is taken (~14000 connections).
    client_pod.netns.sysctl("net.ipv4.tcp_tw_reuse", "1")
    cgroup = make_cgroup()
    bench.on_exit(f"cgroup {cgroup}", lambda: remove_cgroup(cgroup))
    state = bench.root / "state"
    backends = make_backends(a.modes, state)
    target = pod_target(client_pod, cgroup)
    if "ebpf" in backends:  # runs after the backends' remove (cleanups run last-in first-out)
        bench.on_exit("bpffs", lambda: unmount_if_mounted(state))
    for name, backend in backends.items():
        if backend is not None:
            bench.on_exit(f"{name} redirect", remover(backend, target))

    pin = ["--cpus", a.cpus] if a.cpus else []
    server = Worker.start("server", server_pod.netns, ["server", "--port", str(SERVER_PORT), *pin])
    bench.on_exit("server", server.stop)
    upstream = f"{server_pod.ipv4}:{SERVER_PORT}"
    proxy_args = ["proxy", "--port", str(PROXY_PORT), "--upstream", upstream, "--cgroup", str(cgroup)]
    proxy = Worker.start("proxy", client_pod.netns, [*proxy_args, "--uid", str(PROXY_UID), *pin])
    bench.on_exit("proxy", proxy.stop)
    client = Worker.start("client", client_pod.netns, ["client", "--cgroup", str(cgroup), *pin])
    bench.on_exit("client", client.stop)

    rig = Rig(client, proxy, server_pod.ipv4, backends, target, spec_of(a.spec), a.size, a.phase_limit,
              a.settle, a.conntrack)  # fmt: skip
    log(f"node netns {node.netns.name}; client pod {client_pod.ipv4} (netns {client_pod.netns.name}, cgroup "
        f"{cgroup}), server pod {upstream} (netns {server_pod.netns.name}); {environment_line(backends)}")  # fmt: skip
    modes: list[str] = []
    for mode in a.modes:
        t0 = time.monotonic()
        try:
            rig.phase(mode, WARMUP_REQUESTS, WARMUP_CONNECTIONS)
        except BackendError as e:
            if mode == "direct":
                raise
            log(f"warm-up {mode}: backend unavailable here, left out: {e}")
            continue
        modes.append(mode)
        log(f"warm-up {mode}: ok ({time.monotonic() - t0:.2f} s, every connection through the proxy)")

    samples = {m: ModeSamples() for m in modes}
    schedule = interleaved_schedule(a.rounds, modes, rotate=a.rotate)
    for r, mode in schedule:
        t0 = time.monotonic()
        rtt, cycles, elapsed = rig.phase(mode, a.requests, a.connections)
        samples[mode].add_round(rtt, cycles, len(cycles), elapsed)
        log(f"round {r + 1}/{a.rounds} {mode}: {len(rtt)} round trips p50 {percentile(rtt, 50) / 1000:.1f} µs, "
            f"{len(cycles)} connections {rate_per_second(len(cycles), elapsed):.0f}/s "
            f"({time.monotonic() - t0:.2f} s)")  # fmt: skip
    return samples


def report(a: argparse.Namespace, argv: list[str], samples: dict[str, ModeSamples], seconds: float) -> str:
    summaries = {m: summarise(m, s) for m, s in samples.items()}
    cmd = shlex.join([".venv/bin/python", "bench/redirect_overhead.py", *argv])
    lines = [
        f"$ {cmd}",
        f"{platform.release()} kernel, {os.cpu_count()} CPUs; spec {a.spec}; {a.rounds} rounds "
        f"({'rotated' if a.rotate else 'a,b,c order'}); {a.size}-byte request/response; conntrack {a.conntrack}; "
        f"CPUs pinned: {a.cpus or 'no'}; "
        f"{seconds:.0f} s",
        "",
        "Latency: one request/response on an open connection (client → proxy → server → proxy → client).",
        "conn/s: connect + 1 request/response + close, sequential. cost = mode / (a) for latency and",
        "(a) / mode for conn/s, so > 1 is overhead for every figure.",
        "",
        render_table(result_rows(summaries), RESULT_HEADER),
        "",
        "cost: from the samples pooled over all rounds. paired: median over rounds of the cost against",
        "the (a) of the same round (drift between rounds cancels).",
        "",
        render_table(verdict_rows(summaries, samples), VERDICT_HEADER),
    ]
    if "nftables" in samples:
        lines += ["", render_table(nft_verdict_rows(summaries, samples), NFT_VERDICT_HEADER)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(args_list)
    if os.geteuid() != 0:
        print("redirect_overhead.py needs root (netns, iptables, bpf)", file=sys.stderr)
        return 2
    for tool in ("nsenter", "ip"):
        if shutil.which(tool) is None:
            print(f"{tool} not found on PATH", file=sys.stderr)
            return 2

    stop_like_ctrl_c()
    bench = Bench(Path(tempfile.mkdtemp(prefix="hr-bench-redirect-", dir="/tmp")))
    bench.on_exit("files", lambda: shutil.rmtree(bench.root, ignore_errors=True))
    t0 = time.monotonic()
    try:
        samples = run(a, bench)
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    except (BenchError, BackendError) as e:
        log(f"error: {e}")
        return 1
    finally:
        with uninterrupted():  # let the cleanup finish
            bench.close()
    text = report(a, args_list, samples, time.monotonic() - t0)
    print(text)
    if a.json:
        write_json(a.json, samples, text)
    return 0


def write_json(path: Path, samples: dict[str, ModeSamples], text: str) -> None:
    data = {m: vars(summarise(m, s)) | {"rounds": s.round_figures} for m, s in samples.items()}
    out: IO[str]
    with path.open("w") as out:
        json.dump({"summaries": data, "labels": MODE_LABELS, "table": text}, out, indent=1)


if __name__ == "__main__":
    sys.exit(main())
