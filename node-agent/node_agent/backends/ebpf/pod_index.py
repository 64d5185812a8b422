"""Every pod's parameters in the node maps the node-wide cgroup and TC programs read (layouts of
bpf/headrace_redirect.h): hr_pod_cfg holds each pod's config under its netns cookie; hr_pod_ports and
hr_pod_nets its sets under (netns cookie, config generation, kind). A new spec's sets go in beside the old
ones, then the config entry is replaced (one write: a program sees either the old config and sets or the
new ones), then the old sets are dropped. The pod's own pinned maps (hr_cfg, hr_cfg_xports, ...) hold the
same entries without the netns and generation: the record of what to drop later. hr_pod_tc maps each pod's
TC slot (the classid of its TC filters, in its config) to its netns cookie.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from node_agent.backends.ebpf import bpfsys, maps, pinning

log = logging.getLogger("headrace.backend.ebpf")

CONFIG = "hr_pod_cfg"
PORTS = "hr_pod_ports"
NETS = "hr_pod_nets"
TC = "hr_pod_tc"
SLOTS = 0xFFFF  # TC slots 1..65535: a TC program sees 16 bits of its filter's classid
# the pod's own set maps: (node map, kind) their entries go to (HR_SET_* of the header)
SETS: dict[str, tuple[str, int]] = {
    "hr_cfg_xports": (PORTS, 1),
    "hr_cfg_oports": (PORTS, 2),
    "hr_cfg_xin": (PORTS, 3),
    "hr_cfg_iin": (PORTS, 4),
    "hr_cfg_xnets": (NETS, 1),
    "hr_cfg_inets": (NETS, 2),
    "hr_cfg_local": (NETS, 3),
}
NET_KEY_BITS = 160  # HR_NET_KEY_BITS: netns, generation and kind ahead of the address
PORT_KEY = struct.Struct("=QQHHI")  # struct hr_port_key
NET_KEY = struct.Struct("=IQQI16s")  # struct hr_net_key
POD_PORT = struct.Struct(maps.PORT_FMT)
POD_NET = struct.Struct(maps.LPM_FMT)


def config_key(netns: int) -> bytes:
    return struct.pack("=Q", netns)


def slot_key(slot: int) -> bytes:
    return struct.pack("=I", slot)


def first_slot(netns: int) -> int:
    """Pure: where the search for a free TC slot starts (spread by the cookie, so that a node's pods seldom
    try a taken one)."""
    return netns % SLOTS + 1


def claim(node_fds: dict[str, int], netns: int, cgroup: int, held: int, wants_slot: bool) -> tuple[int, bool]:
    """Before an apply of the pod in that cgroup: its TC slot and whether it was taken now (tc_slot; (0, False)
    when it wants none). OSError (EBUSY) when the node's config entry for the netns is another pod's: one
    netns has one entry, which two pods would overwrite in turn."""
    raw = bpfsys.map_lookup(node_fds[CONFIG], config_key(netns), maps.CONFIG_SIZE)
    other = None if raw is None else maps.unpack_config(raw)["cgroup_id"]
    if other is not None and other != cgroup:
        raise OSError(errno.EBUSY, f"its netns already carries the eBPF redirection of the pod in cgroup id {other}")
    return tc_slot(node_fds, netns, held) if wants_slot else (0, False)


def tc_slot(node_fds: dict[str, int], netns: int, held: int) -> tuple[int, bool]:
    """The pod's TC slot and whether it was taken now: `held` while hr_pod_tc maps it to this netns, else the
    first free one from first_slot (a slot whose netns has no config entry any more is free: a pod removed
    while the agent was down); (0, False) when every slot is taken."""
    fd = node_fds[TC]
    if held and bpfsys.map_lookup(fd, slot_key(held), 8) == config_key(netns):
        return held, False
    start = first_slot(netns)
    for i in range(SLOTS):
        slot = (start - 1 + i) % SLOTS + 1
        owner = bpfsys.map_lookup(fd, slot_key(slot), 8)
        if owner is None or bpfsys.map_lookup(node_fds[CONFIG], owner, maps.CONFIG_SIZE) is None:
            bpfsys.map_update(fd, slot_key(slot), config_key(netns))
            return slot, True
    return 0, False


def release_slot(node_fds: dict[str, int], slot: int, netns: int) -> None:
    """Free the slot while it is this netns' (absent: fine)."""
    fd = node_fds[TC]
    if slot and bpfsys.map_lookup(fd, slot_key(slot), 8) == config_key(netns):
        try:
            bpfsys.map_delete(fd, slot_key(slot))
        except bpfsys.BpfSysError as e:
            if e.errno != errno.ENOENT:
                raise


def node_key(pod_map: str, pod_key: bytes, netns: int, generation: int) -> tuple[str, bytes]:
    """Pure: the node map and key of an entry of the pod's own set map `pod_map`."""
    node_map, kind = SETS[pod_map]
    if node_map == PORTS:
        (port,) = POD_PORT.unpack(pod_key)
        return node_map, PORT_KEY.pack(netns, generation, port, kind, 0)
    prefixlen, addr = POD_NET.unpack(pod_key)
    return node_map, NET_KEY.pack(NET_KEY_BITS + prefixlen, netns, generation, kind, addr)


def sets_of(pm: maps.PodMaps) -> dict[str, tuple[bytes, ...]]:
    """Pure: the pod's set entries by its own map's name."""
    return {
        "hr_cfg_xports": pm.exclude_ports,
        "hr_cfg_oports": pm.include_ports,
        "hr_cfg_xin": pm.exclude_inbound,
        "hr_cfg_iin": pm.include_inbound,
        "hr_cfg_xnets": pm.exclude_nets,
        "hr_cfg_inets": pm.include_nets,
        "hr_cfg_local": pm.local_addrs,
    }


def _node_entries(sets: Mapping[str, Iterable[bytes]], netns: int, generation: int) -> list[tuple[str, bytes]]:
    return [node_key(name, key, netns, generation) for name, keys in sets.items() for key in keys]


@dataclass(frozen=True)
class Pinned:
    """What a pod's pinned maps say it has in the node maps."""

    netns: int
    generation: int
    config: bytes
    sets: dict[str, list[bytes]]
    slot: int = 0


def pinned(pdir: Path) -> Pinned | None:
    """The pod's pinned config and sets (None: no config pinned)."""
    raw = read_config_raw(pdir)
    if raw is None:
        return None
    cfg = maps.unpack_config(raw)
    sets: dict[str, list[bytes]] = {}
    for name in SETS:
        fd = pinning.open_pinned(pdir / name)
        if fd is None:
            continue
        try:
            size = POD_PORT.size if SETS[name][0] == PORTS else POD_NET.size
            sets[name] = bpfsys.map_keys(fd, size)
        finally:
            os.close(fd)
    return Pinned(cfg["netns_cookie"], cfg["generation"], raw, sets, cfg["tc_slot"])


def read_config_raw(pdir: Path) -> bytes | None:
    """The pod's pinned config map's value, or None."""
    fd = pinning.open_pinned(f"{pdir}/hr_cfg")
    if fd is None:
        return None
    try:
        return bpfsys.map_lookup(fd, b"\0\0\0\0", maps.CONFIG_SIZE)
    finally:
        os.close(fd)


def add_sets(node_fds: dict[str, int], pm: maps.PodMaps, netns: int) -> None:
    for node_map, key in _node_entries(sets_of(pm), netns, pm.generation):
        bpfsys.map_update(node_fds[node_map], key, b"\1")


def point_config(node_fds: dict[str, int], config: bytes, netns: int) -> None:
    """The switch: the pod's config entry (and so the generation of sets its programs read)."""
    bpfsys.map_update(node_fds[CONFIG], config_key(netns), config)


def drop(
    node_fds: dict[str, int], sets: Mapping[str, Iterable[bytes]], netns: int, generation: int, *, config: bool
) -> None:
    """Remove these sets' entries of that generation (and the config entry when `config`); absent ones are
    fine."""
    entries = _node_entries(sets, netns, generation)
    if config:
        entries.insert(0, (CONFIG, config_key(netns)))
    for node_map, key in entries:
        try:
            bpfsys.map_delete(node_fds[node_map], key)
        except bpfsys.BpfSysError as e:
            if e.errno != errno.ENOENT:
                raise


def _lookup(node_dir: Path, name: str, key: bytes, size: int, node_fds: dict[str, int] | None) -> bytes | None:
    """The value under key in the node map pinned as name, through its open fd when given (OSError when it
    is not pinned)."""
    if node_fds is not None:
        return bpfsys.map_lookup(node_fds[name], key, size)
    fd = pinning.open_pinned(node_dir / name)
    if fd is None:
        raise FileNotFoundError(f"the node's eBPF map {name} is not pinned in {node_dir}")
    try:
        return bpfsys.map_lookup(fd, key, size)
    finally:
        os.close(fd)


def problems(node_dir: Path, netns: int, config: bytes, node_fds: dict[str, int] | None = None) -> list[str]:
    """Why the node's config entry for the pod's netns is not its pinned config, or its TC slot not its
    netns' ([] when both are). node_fds: the node maps, open (else opened by their pins)."""
    slot = maps.unpack_config(config)["tc_slot"]
    try:
        found = _lookup(node_dir, CONFIG, config_key(netns), maps.CONFIG_SIZE, node_fds)
        owner = _lookup(node_dir, TC, slot_key(slot), 8, node_fds) if slot else config_key(netns)
    except OSError as e:
        return [str(e)]
    if found is None:
        return ["the pod's netns has no entry in the node's eBPF pod config map"]
    if found != config:
        return ["the node's eBPF pod config map holds another config for the pod's netns"]
    return [] if owner == config_key(netns) else [f"the node's eBPF TC slot {slot} is not the pod's netns'"]


def drop_stale(node_fds: dict[str, int], old: Pinned | None, netns: int, pm: maps.PodMaps, pod: str) -> None:
    """After an apply: the entries of the pod's previous config (`old`, as pinned before) that the new ones
    did not replace: all of them for another netns (or a pod pinned by an older layout), else the sets of
    another generation, and a TC slot it no longer has."""
    try:
        if old is not None and old.netns != netns:
            drop(node_fds, old.sets, old.netns, old.generation, config=True)
            release_slot(node_fds, old.slot, old.netns)
            return
        if old is not None and old.generation != pm.generation:
            drop(node_fds, old.sets, netns, old.generation, config=False)
        if old is not None and old.slot != maps.unpack_config(pm.config)["tc_slot"]:
            release_slot(node_fds, old.slot, netns)
    except bpfsys.BpfSysError as e:  # harmless: nothing leads to stale entries
        log.warning("ebpf stale node entries not dropped", extra={"pod": pod, "reason": str(e)})


def undo(
    node_fds: dict[str, int], old: Pinned | None, netns: int, pm: maps.PodMaps, *, indexed: bool, switched: bool
) -> None:
    """A failed apply's entries: the config entry back to the pinned config (or gone), the new generation's
    sets gone unless they are the old ones."""
    same_netns = old is not None and old.netns == netns
    try:
        if switched:
            if old is not None and same_netns:
                point_config(node_fds, old.config, netns)
            else:
                drop(node_fds, {}, netns, pm.generation, config=True)
        if indexed and not (old is not None and same_netns and old.generation == pm.generation):
            drop(node_fds, sets_of(pm), netns, pm.generation, config=False)
    except OSError as e:
        log.warning("ebpf node entries rollback failed", extra={"reason": str(e)})


def drop_pod(node_dir: Path, pdir: Path) -> None:
    """A removed pod's entries, named by its pinned maps (none pinned, or no netns cookie: nothing)."""
    old = pinned(pdir) if pdir.is_dir() else None
    if old is None or not old.netns:
        return
    fds: dict[str, int] = {}
    try:
        for name in (CONFIG, PORTS, NETS, TC):
            fd = pinning.open_pinned(node_dir / name)
            if fd is None and name != TC:  # (no TC map: pinned by an older build, which gave no slots)
                return
            if fd is not None:
                fds[name] = fd
        drop(fds, old.sets, old.netns, old.generation, config=True)
        if TC in fds:
            release_slot(fds, old.slot, old.netns)
    finally:
        for fd in fds.values():
            os.close(fd)
