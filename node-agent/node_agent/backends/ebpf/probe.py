"""Can the eBPF backend run here? Each check names what is missing and how to supply it."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from node_agent.backends.ebpf import bpfsys, loader
from node_agent.backends.ebpf.attach import cgroup2_mounts


def probe(cache_dir: str | Path | None = None, background: bool = False) -> list[str]:
    """Problems that stop the eBPF backend on this node (empty: it can run). Compiles once, or reads the
    object compiled by an earlier run from cache_dir (then neither bcc nor the headers are needed).

    background: when the object must be compiled (nothing cached), check only what can be checked without
    it and compile (then probe-load) in a thread: the agent starts serving meanwhile, and a failure is
    reported by loader.failure() (the backend then declines pods, or refuses them when eBPF is forced)."""
    if cache_dir is not None:
        loader.use_cache_dir(cache_dir)
    cached = loader.cached_available()
    problems = [] if cached else loader.toolchain_problems()
    if not cgroup2_mounts():
        problems.append(
            "no cgroup2 filesystem is mounted: mount cgroup2 (e.g. at /sys/fs/cgroup/unified) and give "
            "the agent the host's cgroup tree"
        )
    if os.geteuid() != 0:
        problems.append(
            "the agent is not root: loading cgroup BPF programs needs CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN"
        )
    if problems:
        return problems
    if background and not cached:
        loader.compile_in_background(probe_load)
        return []
    try:
        obj = loader.compile_object()
    except loader.ToolchainError as e:
        return [str(e)]
    problem = probe_load(obj)
    return [problem] if problem else []


def probe_load(obj: loader.CompiledObject) -> str | None:
    """Load the programs of each type against throwaway maps: the verifier and the kernel's program types
    say yes (None) or no (why)."""
    fds: dict[str, int] = {}
    try:
        for name in (*loader.POD_MAPS, *loader.NODE_MAPS):  # the verifier needs the shapes, not the sizes
            spec = obj.maps[name]
            small = dataclasses.replace(spec, max_entries=min(spec.max_entries, 16)) if spec.max_entries else spec
            fds[name] = bpfsys.map_create(small, name)
        connect4 = loader.MODE_FUNCTIONS["hr_connect4"]  # both modes' (each with its own checks)
        for pname in (*connect4, "hr_sock_create", "hr_sockops", "hr_getsockopt", "hr_tc_ingress", "hr_tc_egress"):
            prog = obj.programs[pname]
            fd = bpfsys.prog_load(prog.prog_type, prog.patched(fds), pname, prog.attach_type, loader.LICENSE)
            os.close(fd)
    except bpfsys.BpfSysError as e:
        tail = f" (verifier: {e.log.strip().splitlines()[-1]})" if e.log.strip() else ""
        return (
            f"the kernel refused the probe program: {e}{tail}; needs Linux >= 5.15 with "
            f"CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF and CONFIG_NET_CLS_BPF"
        )
    finally:
        for fd in fds.values():
            os.close(fd)
    return None
