"""Compile bpf/redirect.c with bcc once per process and keep only what loading needs.

bcc compiles the C and creates template maps; we copy out each program's instructions, note which
instructions load which map (BPF_PSEUDO_MAP_FD relocations), read each map's shape, and then release the
bcc module (so its template maps and nothing else of ours stays in the kernel). The cgroup and TC programs are
then loaded once per node (node_programs.py); each pod gets fresh maps from this object (and, without a TC
slot, TC programs of its own).
The object is also kept on disk (object_cache.py), keyed by the sources, the kernel release and the bcc
version: a restarted agent reads it instead of compiling (seconds).
The compile itself runs in a child process (compile_child.py): bcc and LLVM never enter the agent, which
would otherwise keep ~180 MiB of them resident for its whole life.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from node_agent.backends.ebpf import bpfsys, object_cache

log = logging.getLogger("headrace.backend.ebpf")

BPF_PSEUDO_MAP_FD = 1
LD_IMM64 = 0x18
C_FILE = "redirect.c"
HEADER = "headrace_redirect.h"

# program name -> (program type, expected attach type)
PROGRAMS: dict[str, tuple[int, int]] = {
    "hr_connect4": (bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET4_CONNECT),
    "hr_connect6": (bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET6_CONNECT),
    "hr_sockops": (bpfsys.PROG_TYPE_SOCK_OPS, bpfsys.ATTACH_CGROUP_SOCK_OPS),
    "hr_getsockopt": (bpfsys.PROG_TYPE_CGROUP_SOCKOPT, bpfsys.ATTACH_CGROUP_GETSOCKOPT),
    "hr_sendmsg4": (bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, bpfsys.ATTACH_CGROUP_UDP4_SENDMSG),
    "hr_sendmsg6": (bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, bpfsys.ATTACH_CGROUP_UDP6_SENDMSG),
    "hr_recvmsg4": (bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, bpfsys.ATTACH_CGROUP_UDP4_RECVMSG),
    "hr_recvmsg6": (bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, bpfsys.ATTACH_CGROUP_UDP6_RECVMSG),
    "hr_getpeername4": (bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET4_GETPEERNAME),
    "hr_getpeername6": (bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET6_GETPEERNAME),
    "hr_sock_create": (bpfsys.PROG_TYPE_CGROUP_SOCK, bpfsys.ATTACH_CGROUP_INET_SOCK_CREATE),
}
TC_PROGRAMS: dict[str, tuple[int, int]] = {
    "hr_tc_ingress": (bpfsys.PROG_TYPE_SCHED_CLS, 0),
    "hr_tc_egress": (bpfsys.PROG_TYPE_SCHED_CLS, 0),
}
# The node's change counts (bpf_watch.py): tracepoint programs on bpf(2), on setsockopt(2) and io_uring (legacy
# iptables tables), their maps.
WATCH_PROGRAMS: dict[str, tuple[int, int]] = dict.fromkeys(
    ("hr_bpf_watch", "hr_bpf_watch_exit", "hr_xt_watch", "hr_xt_watch_exit", "hr_xt_uring_submit", "hr_xt_uring_done"),
    (bpfsys.PROG_TYPE_TRACEPOINT, 0),
)
WATCH_MAPS = ("hr_watch_self", "hr_bpf_changes", "hr_watch_busy", "hr_watch_layout", "hr_xt_changes", "hr_xt_busy")
# The C function a program is loaded from, per pod mode, where it is not the program's own name: the mode is
# a constant in these, so the verifier walks one mode's paths (connect6: ~4 100 instructions processed and
# 4.2 ms a load here, ~1 400 and 1.2 ms once specialised). Loaded and pinned under the program's name.
MODE_FUNCTIONS: dict[str, tuple[str, str]] = {  # program: (sidecar, ambient)
    "hr_connect4": ("hr_connect4_sc", "hr_connect4_amb"),
    "hr_connect6": ("hr_connect6_sc", "hr_connect6_amb"),
}
# The function a program loaded once per node is loaded from where it differs from the per-pod one: the TC
# programs that find the pod's parameters in the node maps by their filter's classid (pod_index.tc_slot).
NODE_FUNCTIONS: dict[str, str] = {"hr_tc_ingress": "hr_tc_ingress_node", "hr_tc_egress": "hr_tc_egress_node"}
POD_MAPS = (
    "hr_cfg",
    "hr_cfg_xports",
    "hr_cfg_xnets",
    "hr_cfg_inets",
    "hr_cfg_xin",
    "hr_cfg_iin",
    "hr_cfg_local",
    "hr_cfg_oports",
)
# every pod's parameters for the node's cgroup and TC programs, by netns cookie and TC slot (pod_index.py)
INDEX_MAPS = ("hr_pod_cfg", "hr_pod_ports", "hr_pod_nets", "hr_pod_tc")
NODE_MAPS = ("hr_cookie_orig", "hr_conn_orig", "hr_seq_orig", "hr_dns_orig", "hr_sock_owner", "hr_nat", "hr_in_orig",
             *INDEX_MAPS)
LICENSE = "Dual MIT/GPL"


def function_of(program: str, ambient: bool, *, node: bool = False) -> str:
    """The compiled function a pod of that mode loads as `program` (node: the node-wide program)."""
    if node and program in NODE_FUNCTIONS:
        return NODE_FUNCTIONS[program]
    pair = MODE_FUNCTIONS.get(program)
    return program if pair is None else pair[1 if ambient else 0]


def compiled_functions() -> dict[str, tuple[int, int]]:
    """Every function the object holds: name → (program type, attach type) of the program it is loaded as."""
    out = {name: types for name, types in (PROGRAMS | TC_PROGRAMS | WATCH_PROGRAMS).items()
           if name not in MODE_FUNCTIONS}
    for program, functions in MODE_FUNCTIONS.items():
        out.update(dict.fromkeys(functions, PROGRAMS[program]))
    for program, function in NODE_FUNCTIONS.items():
        out[function] = TC_PROGRAMS[program]
    return out


class ToolchainError(Exception):
    """bcc, kernel headers or the C sources are missing or do not compile; the message says how to fix it."""


@dataclass(frozen=True)
class Program:
    name: str
    prog_type: int
    attach_type: int
    insns: bytes
    relocs: tuple[tuple[int, str], ...]  # (instruction index, map name)

    def patched(self, fds: dict[str, int]) -> bytes:
        """The instructions with each map load pointing at the given map fds."""
        out = bytearray(self.insns)
        for idx, mapname in self.relocs:
            struct.pack_into("=i", out, idx * 8 + 4, fds[mapname])
        return bytes(out)


@dataclass(frozen=True)
class CompiledObject:
    programs: dict[str, Program]
    maps: dict[str, bpfsys.MapSpec]

    @functools.cached_property
    def digest(self) -> str:
        """A short hash of the programs and the maps' shapes: names the node's programs of this build."""
        h = hashlib.sha256()
        for name in sorted(self.programs):
            p = self.programs[name]
            h.update(repr((name, p.prog_type, p.attach_type, p.relocs)).encode() + p.insns)
        h.update(repr(sorted(self.maps.items())).encode())
        return h.hexdigest()[:16]


def bpf_source_dir() -> Path:
    """Where redirect.c lives: $HEADRACE_BPF_DIR, the repo's bpf/, or node_agent/bpf (package data)."""
    env = os.environ.get("HEADRACE_BPF_DIR")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [here.parents[4] / "bpf", here.parents[2] / "bpf"]
    for c in candidates:
        if (c / C_FILE).is_file():
            return c
    raise ToolchainError(
        f"eBPF sources {C_FILE} not found (looked in {', '.join(str(c) for c in candidates)}); "
        "set HEADRACE_BPF_DIR to the directory holding bpf/redirect.c"
    )


def kernel_headers_problem() -> str | None:
    """None when bcc can find a kernel header tree, else what is missing and how to supply it."""
    build = Path("/lib/modules") / os.uname().release / "build"
    if not (build / "include").is_dir() and not (build / "Makefile").exists():
        return (
            f"kernel headers missing: {build} does not lead to a header tree; install linux-headers "
            f"(Debian: linux-headers-amd64) and link /lib/modules/{os.uname().release}/build and /source to it "
            "(on a node: mount /lib/modules and /usr/src into the agent)"
        )
    return None


def relocations(insns: bytes, fd_names: dict[int, str]) -> tuple[tuple[int, str], ...]:
    """Pure: find the 64-bit immediate loads of map fds (BPF_PSEUDO_MAP_FD) in an instruction stream."""
    out: list[tuple[int, str]] = []
    n = len(insns) // 8
    i = 0
    while i < n:
        code, regs, _off, imm = struct.unpack_from("=BBhi", insns, i * 8)
        if code == LD_IMM64:
            if (regs >> 4) == BPF_PSEUDO_MAP_FD:
                if imm not in fd_names:
                    raise ToolchainError(f"instruction {i} loads unknown map fd {imm}")
                out.append((i, fd_names[imm]))
            i += 2
            continue
        i += 1
    return tuple(out)


_lock = threading.Lock()
_cached: CompiledObject | None = None
compile_count = 0  # observable by tests and benchmarks: compile once per process at most
cache_loads = 0  # objects read from the on-disk cache instead
_cache_dir: Path | None = None
CACHE_ENV = "HEADRACE_BPF_CACHE_DIR"
CACHE_DIR = "bpf-cache"  # under the agent's state dir
FAILED_COMPILE = "compile failed: "


def set_cache_dir(path: str | Path | None) -> None:
    """Where compiled objects are kept between agent runs (the agent: <state-dir>/bpf-cache);
    $HEADRACE_BPF_CACHE_DIR wins; None: no disk cache."""
    global _cache_dir
    _cache_dir = Path(path) if path is not None else None


def cache_dir() -> Path | None:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else _cache_dir


def use_cache_dir(path: str | Path) -> None:
    """`set_cache_dir(path)` unless a cache dir is set already (the first of the agent's users decides)."""
    if cache_dir() is None:
        set_cache_dir(path)


def toolchain_problems() -> list[str]:
    """What a compile would miss here (bcc, kernel headers), each with how to supply it; [] when it can run."""
    problems = []
    if importlib.util.find_spec("bcc") is None:
        problems.append("bcc is not importable: install python3-bpfcc and expose /usr/lib/python3/dist-packages/bcc "
                        "to the agent's Python (make setup does this)")
    headers = kernel_headers_problem()
    if headers:
        problems.append(headers)
    return problems


def bcc_version() -> str:
    """The installed bcc's version, read from its package without importing it ("" when absent)."""
    spec = importlib.util.find_spec("bcc")
    if spec is None or not spec.submodule_search_locations:
        return ""
    for loc in spec.submodule_search_locations:
        try:
            return (Path(loc) / "version.py").read_text(encoding="utf-8").strip()
        except OSError:
            continue
    return ""


def object_key() -> str:
    """The cache key of the object this process would compile: sources, kernel release, bcc version."""
    src = bpf_source_dir()
    sources = [(src / name).read_bytes() for name in (C_FILE, HEADER)]
    return object_cache.cache_key(sources, os.uname().release, bcc_version())


def compile_object() -> CompiledObject:
    """The compiled programs: from this process's memory, else the disk cache, else compiled by bcc (then
    written to the disk cache)."""
    with _lock:
        return _compile_locked()


def _compile_locked() -> CompiledObject:
    global _cached, compile_count, cache_loads, _failure
    if _cached is not None:
        return _cached
    if _failure is not None and _failure.startswith(FAILED_COMPILE):
        raise ToolchainError(_failure)
    where = cache_dir()
    try:
        key = object_key() if where is not None else ""
        obj = _load_cached(where, key) if where is not None else None
        if obj is not None:
            cache_loads += 1
            _cached = obj
            return obj
        obj = _compile()
    except ToolchainError as e:
        _failure = f"{FAILED_COMPILE}{e}"
        raise
    _cached = obj
    compile_count += 1
    if where is not None:
        try:
            object_cache.write(where, key, encode(key, obj))
        except OSError as e:
            log.warning("ebpf object cache not written", extra={"reason": str(e), "dir": str(where)})
    return obj


_failure: str | None = None
_busy = False


def compile_in_background(verify: Callable[[CompiledObject], str | None]) -> None:
    """Compile (then verify) in a thread; compile_object() callers wait for it (the thread holds the lock
    before this returns). A failure is kept for failure(); a failed compile is raised by compile_object()
    from then on."""
    global _busy
    started = threading.Event()
    _busy = True

    def work() -> None:
        global _failure, _busy
        with _lock:
            started.set()
            try:
                problem = verify(_compile_locked())
            except ToolchainError as e:
                problem = str(e)
            except Exception as e:  # reported as the reason eBPF is unavailable here
                problem = f"eBPF object not usable: {e}"
            if problem and _failure is None:
                _failure = problem
            _busy = False
        if problem:
            log.error("ebpf unavailable: %s", problem, extra={"event": "ebpf_compile_failed"})
        else:
            log.info("ebpf object ready", extra={"event": "ebpf_compiled", "compiles": compile_count})

    threading.Thread(target=work, name="headrace-bpf-compile", daemon=True).start()
    started.wait()


def busy() -> bool:
    """True while the background compile runs (compile_object() would wait for it)."""
    return _busy


def failure() -> str | None:
    """Why the background compile (or its probe load) failed; None when it did not (or is still running)."""
    return _failure


def cached_available() -> bool:
    """True when compile_object() will not need bcc: in memory, or a usable cache file for this key."""
    with _lock:
        if _cached is not None:
            return True
    where = cache_dir()
    try:
        return where is not None and object_cache.read(where, object_key()) is not None
    except (object_cache.CacheError, ToolchainError, OSError):
        return False


def encode(key: str, obj: CompiledObject) -> bytes:
    progs = {n: (p.prog_type, p.attach_type, p.insns, p.relocs) for n, p in obj.programs.items()}
    return object_cache.encode(key, progs, obj.maps)


def _decode(raw: bytes, key: str) -> CompiledObject:
    progs, maps = object_cache.decode(raw, key, set(compiled_functions()), {*POD_MAPS, *NODE_MAPS, *WATCH_MAPS})
    return CompiledObject({n: Program(n, *p) for n, p in progs.items()}, maps)


def _load_cached(where: Path, key: str) -> CompiledObject | None:
    try:
        raw = object_cache.read(where, key)
        return _decode(raw, key) if raw is not None else None
    except object_cache.CacheError as e:
        log.warning("ebpf object cache not used", extra={"reason": str(e), "dir": str(where)})
        return None


CHILD_KEY = "compiled-by-child"
COMPILE_TIMEOUT = 300.0


def _compile() -> CompiledObject:
    """compile_here() in a child process of the same interpreter and import path; its stdout carries the
    object (checked as a cache file is), its stderr (clang's errors) goes to ours."""
    if not sys.executable:
        return compile_here()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    argv = [sys.executable, "-m", "node_agent.backends.ebpf.compile_child"]
    try:
        res = subprocess.run(argv, stdout=subprocess.PIPE, env=env, timeout=COMPILE_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ToolchainError(f"the eBPF compile process failed: {e}") from e
    if res.returncode != 0:
        why = res.stdout.decode(errors="replace").strip() or f"it exited with status {res.returncode}"
        raise ToolchainError(why)
    try:
        return _decode(res.stdout, CHILD_KEY)
    except object_cache.CacheError as e:
        raise ToolchainError(f"the eBPF compile process answered an unusable object: {e}") from e


def compile_here() -> CompiledObject:
    """bcc's compile in this process (the child's job)."""
    try:
        from bcc import BPF
        from bcc.libbcc import lib
    except ImportError as e:
        raise ToolchainError(
            f"bcc is not importable ({e}); install python3-bpfcc and expose "
            "/usr/lib/python3/dist-packages/bcc to the agent's Python (make setup does this)"
        ) from e
    problem = kernel_headers_problem()
    if problem:
        raise ToolchainError(problem)
    src = bpf_source_dir()
    try:
        module = BPF(
            src_file=str(src / C_FILE).encode(),
            cflags=[f"-I{src}", "-Wno-unused-function", "-Wno-macro-redefined"],
        )
    except Exception as e:
        raise ToolchainError(f"bcc failed to compile {src / C_FILE}: {e} (see the clang errors above)") from e
    try:
        fd_names: dict[int, str] = {}
        maps: dict[str, bpfsys.MapSpec] = {}
        for name in (*POD_MAPS, *NODE_MAPS, *WATCH_MAPS):
            fd = int(lib.bpf_table_fd(module.module, name.encode()))  # also the map types bcc has no class for
            if fd < 0:
                raise ToolchainError(f"bcc created no map {name}")
            fd_names[fd] = name
            maps[name] = bpfsys.map_info(fd).spec
        programs: dict[str, Program] = {}
        for name, (ptype, atype) in compiled_functions().items():
            insns = bytes(module.dump_func(name.encode()))
            programs[name] = Program(name, ptype, atype, insns, relocations(insns, fd_names))
    finally:
        module.cleanup()
    return CompiledObject(programs, maps)
