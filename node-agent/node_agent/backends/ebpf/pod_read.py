"""The drift check's read of one pod's eBPF part (programs, pins, node entries, TC filters): through
`intact_cache` while nothing the last intact read saw has changed, else in full
(`pod_state.problems_and_hooks`, the parent-cgroup findings recorded by `parent_progs.watch_parents`). A
pod whose inbound is on TC gets its TC watch (`tc_watch`) opened before the full read, kept with what the
read found when it is intact."""

from __future__ import annotations

from pathlib import Path

from node_agent.backends.base import PodTarget, RedirectSpec
from node_agent.backends.ebpf import bpfsys, cgroup_programs, maps, pod_index, pod_state, tc, tc_watch
from node_agent.backends.ebpf.attach import CgroupError
from node_agent.backends.ebpf.intact_cache import IntactPods
from node_agent.backends.ebpf.parent_progs import watch_parents


def read_pod(target: PodTarget, spec: RedirectSpec, cg: Path, pdir: Path, node_fds: dict[str, int] | None,
             intact: IntactPods, *, inbound_in_ebpf: bool, node_pins: list[Path],
             generation: int | None = None) -> list[str]:
    """What differs from `spec` in the pod's eBPF part ([]: intact). node_fds: the node maps, open (None:
    read by their pins, and no shortcut); node_pins: the node-level programs that count as ours on the
    pod's ancestors; generation: the node's change count (`bpf_watch`), read before this call."""
    wanted_now = (spec, target.ips, target.cgroup_path, target.netns_path, target.netns_inode)
    config_fd = node_fds[pod_index.CONFIG] if node_fds else None
    if intact.still(target.uid, wanted_now, str(pdir), cg, config_fd, generation):
        return []
    intact.forget(target.uid)
    if not pdir.is_dir():
        return [f"no eBPF pin directory {pdir}"]
    wanted, tc_wanted = cgroup_programs.wanted_programs(spec), pod_state.wants_tc(spec, inbound_in_ebpf)
    watch = None
    try:
        if tc_wanted and intact.may_watch():
            try:
                watch = tc_watch.open_watch(target.netns_path)  # before the read: later changes are announced
            except OSError:
                watch = None  # read in full each time
        problems, hooks, config = pod_state.problems_and_hooks(
            pdir, cg, wanted, maps.wanted_generation(spec, inbound_in_ebpf, target.ips), target.netns_path,
            tc_wanted, node_fds)
        watch_parents(target.uid, cg, pdir, wanted, node_pins, hooks.attached, hooks.effective)
        if not problems and (watch is not None or not tc_wanted):
            intact.remember(target.uid, wanted_now, wanted, str(pdir),
                            maps.unpack_config(config)["netns_cookie"], config, hooks, watch, generation)
            watch = None  # the cache holds it now
    except (bpfsys.BpfSysError, CgroupError, OSError, tc.TcError, ValueError) as e:
        return [f"cannot read eBPF state: {e}"]
    finally:
        if watch is not None:
            watch.close()
    return problems
