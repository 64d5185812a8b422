"""Compile bpf/redirect.c with bcc once per process and keep only what per-pod loading needs.

bcc compiles the C and creates template maps; we copy out each program's instructions, note which
instructions load which map (BPF_PSEUDO_MAP_FD relocations), read each map's shape, and then release the
bcc module (so its template maps and nothing else of ours stays in the kernel). Each pod then gets fresh
maps and programs from this cached object: one ~0.3-1 s compile per agent start, not per pod.
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from node_agent.backends.ebpf import bpfsys

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
NODE_MAPS = ("hr_cookie_orig", "hr_conn_orig", "hr_dns_orig", "hr_sock_owner", "hr_nat")
LICENSE = "Dual MIT/GPL"


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
compile_count = 0  # observable by tests: compile once per process


def compile_object() -> CompiledObject:
    """The compiled programs (compiled on first use, then cached for the life of the process)."""
    global _cached, compile_count
    with _lock:
        if _cached is not None:
            return _cached
        _cached = _compile()
        compile_count += 1
        return _cached


def _compile() -> CompiledObject:
    try:
        from bcc import BPF
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
        for name in (*POD_MAPS, *NODE_MAPS):
            fd = int(module[name.encode()].map_fd)
            fd_names[fd] = name
            maps[name] = bpfsys.map_info(fd).spec
        programs: dict[str, Program] = {}
        for name, (ptype, atype) in (PROGRAMS | TC_PROGRAMS).items():
            insns = bytes(module.dump_func(name.encode()))
            programs[name] = Program(name, ptype, atype, insns, relocations(insns, fd_names))
    finally:
        module.cleanup()
    return CompiledObject(programs, maps)
