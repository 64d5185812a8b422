"""What an eBPF pod's pins say: its config map, and what is missing or extra among its programs (cgroup
and TC) for a wanted spec generation."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from node_agent.backends.base import BackendError, PodTarget, RedirectSpec
from node_agent.backends.ebpf import (
    bpfsys,
    cgroup_programs,
    loader,
    maps,
    pinning,
    pod_index,
    tc,
    tc_foreign,
    tc_status,
)
from node_agent.backends.ebpf.attach import Cgroup, CgroupError, cgroup_id, find_cgroup_by_id
from node_agent.backends.ebpf.foreign_progs import detach_foreign, foreign_problems
from node_agent.backends.ebpf.parent_progs import checked_types
from node_agent.kernel.netns_runner import visiting

TC_PROGRAM = "hr_tc_ingress"
TC_EGRESS = "hr_tc_egress"  # the reverse port rewrite of inbound connections
TC_HOOKS = ((TC_PROGRAM, tc.INGRESS), (TC_EGRESS, tc.EGRESS))
TC_NAMES = (TC_PROGRAM, TC_EGRESS)


def wants_tc(spec: RedirectSpec, inbound_in_ebpf: bool) -> bool:
    """Whether the pod's inbound is captured by TC programs in its netns."""
    return inbound_in_ebpf and maps.needs_inbound(spec)


def read_config(pdir: Path) -> dict[str, int] | None:
    """The pod's pinned config map, unpacked, or None."""
    raw = pod_index.read_config_raw(pdir)
    return maps.unpack_config(raw) if raw else None


def cgroup_of(cgroup_path: str | None, pdir: Path | None) -> Path | None:
    """The pod's cgroup: the one it was given while that exists, else the one its pinned config names."""
    if cgroup_path and Path(cgroup_path).is_dir():
        return Path(cgroup_path)
    cfg = read_config(pdir) if pdir is not None and pdir.is_dir() else None
    return find_cgroup_by_id(cfg["cgroup_id"]) if cfg is not None and cfg["cgroup_id"] else None


def installed(pdir: Path | None, cgroup_path: str | None) -> bool:
    """Whether anything of the pod's eBPF part is there: pins (none without a bpffs: pdir None), or a program
    of ours on its cgroup."""
    if pdir is not None and pdir.is_dir() and any(pdir.iterdir()):
        return True
    cg = cgroup_of(cgroup_path, None)
    if cg is None:
        return False
    try:
        with Cgroup(cg) as c:
            return bool(cgroup_programs.ours_attached(c))
    except (CgroupError, bpfsys.BpfSysError):
        return False


def problems(pdir: Path, cg: Path, wanted: tuple[str, ...], gen: int, netns: str, tc_wanted: bool) -> list[str]:
    """Why the pinned eBPF state of the pod in pdir differs from what is wanted ([] when intact)."""
    return problems_and_hooks(pdir, cg, wanted, gen, netns, tc_wanted)[0]


@dataclass(frozen=True)
class Hooks:
    """The pod cgroup's programs as one drift check read them, per attach type of the wanted programs:
    `attached` to the cgroup itself, and `effective` (the ones that run for it, its ancestors' included) at
    the hooks where an ancestor's program can override ours (parent_progs.checked_types). Where that run
    list is exactly the pod's own program the cgroup's own list is not read again: it is taken to be that
    one program (wherever in the hierarchy it is attached, it is the only one that runs there). `own`: the
    pod's pinned program per attach type, as the read found them."""

    attached: dict[int, list[int]] = field(default_factory=dict)
    effective: dict[int, list[int]] = field(default_factory=dict)
    own: dict[int, int] = field(default_factory=dict)


def problems_and_hooks(
    pdir: Path, cg: Path, wanted: tuple[str, ...], gen: int, netns: str, tc_wanted: bool,
    node_fds: dict[str, int] | None = None,
) -> tuple[list[str], Hooks, bytes]:
    """`problems`, the pod cgroup's programs as read for it (`Hooks`, empty when the config is not pinned):
    the drift check's parent check reuses them, and the pod's pinned config (b"": none). node_fds: the node
    maps, open (else opened by their pins)."""
    problems: list[str] = []
    raw = pod_index.read_config_raw(pdir)
    if not raw:
        return [f"eBPF config map of the pod is not pinned in {pdir}"], Hooks(), b""
    cfg = maps.unpack_config(raw)
    if cfg["generation"] != gen:
        problems.append("eBPF config differs from the wanted spec")
    if cfg["cgroup_id"] != cgroup_id(cg):
        problems.append(f"eBPF programs belong to another cgroup (id {cfg['cgroup_id']})")
    if netns and cfg["netns_ino"] != _inode(netns):
        problems.append(f"eBPF config was made for another netns than {netns}")
    problems += pod_index.problems(pdir.parent / pinning.NODE_DIR, cfg["netns_cookie"], raw, node_fds)
    own: dict[int, int] = {}  # attach type → the pod's pinned program there
    prefix = f"{pdir}/"  # str, not Path joins: this runs for every pod every drift interval
    for name in wanted:  # each pin stat'ed once
        pid = pinning.pinned_prog_id(prefix + name)
        if pid is None:
            problems.append(f"eBPF program {name} is not pinned")
        else:
            own[loader.PROGRAMS[name][1]] = pid
    with Cgroup(cg) as c:  # each hook queried once where only ours runs there
        hooks = read_hooks(c, wanted, own)
    for name in wanted:
        atype = loader.PROGRAMS[name][1]
        if atype in own and own[atype] not in hooks.attached[atype]:
            problems.append(f"eBPF program {name} is not attached to {cg}")
    problems += foreign_problems(cg, hooks.attached, set(own.values()))
    pinned = os.listdir(pdir)  # names only: this runs for every pod every drift interval
    extra = sorted(n for n in pinned if n in loader.PROGRAMS and n not in wanted)
    problems += [f"eBPF program {n} is installed but not wanted" for n in extra]
    if tc_wanted:
        with visiting(netns):  # read from this thread: no hand-over, every pod every drift interval
            problems += tc_status.problems(pdir, netns, TC_HOOKS, cfg["tc_slot"])
    elif TC_PROGRAM in pinned:
        problems.append(f"eBPF program {TC_PROGRAM} is installed but not wanted")
    return problems, hooks, raw


def read_hooks(c: Cgroup, wanted: tuple[str, ...], own: dict[int, int]) -> Hooks:
    """`Hooks` of the open cgroup for the wanted programs; own: attach type → the pod's program there."""
    hooks = Hooks(own=dict(own))
    checked = set(checked_types(wanted))
    for atype in {loader.PROGRAMS[name][1] for name in wanted}:
        if atype in checked:
            hooks.effective[atype] = run = bpfsys.prog_query(c.fd, atype, bpfsys.F_QUERY_EFFECTIVE)
            if atype in own and run == [own[atype]]:
                hooks.attached[atype] = run
                continue
        hooks.attached[atype] = c.attached(atype)
    return hooks


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def foreign_tc(netns: str) -> list[tc_foreign.Foreign]:
    """The foreign TC filters and tcx programs that run before our TC programs on the pod's interfaces."""
    views = tc_status.read(netns, (hook for _name, hook in TC_HOOKS))
    return [x for name, hook in TC_HOOKS for ifname, v in views.get(hook, {}).items()
            for x in tc_foreign.foreign_of(hook, ifname, v.index, v.filters, v.tcx, name)]


def remove_foreign_tc(netns: str, pod: str) -> int:
    """Remove them (the repair); how many there were."""
    return tc_foreign.remove(netns, foreign_tc(netns), pod)


def remove_foreign(cg: Path, pdir: Path, wanted: tuple[str, ...], target: PodTarget, tc_wanted: bool) -> int:
    """The repair of foreign programs at our hooks (pod cgroup; TC ahead of ours); how many there were."""
    gone = detach_foreign(cg, pdir, wanted, target.uid)
    if tc_wanted:
        try:
            gone += remove_foreign_tc(target.netns_path, target.uid)
        except OSError as e:
            raise BackendError(f"eBPF apply for pod {target.uid}: {e}") from e
    return gone
