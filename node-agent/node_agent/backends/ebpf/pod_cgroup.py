"""A pod's cgroup v2 directory before any of its processes exists, from its uid and QoS class.

The kubelet creates the pod-level cgroup before it asks the runtime for the sandbox, so with containerd or
CRI-O the CNI ADD finds the directory but no process in it. Where the kubelet puts it:

| driver | QoS | directory below the cgroup root |
|---|---|---|
| cgroupfs | Guaranteed | `kubepods/pod<uid>` |
| cgroupfs | Burstable / BestEffort | `kubepods/burstable/pod<uid>`, `kubepods/besteffort/pod<uid>` |
| systemd | Guaranteed | `kubepods.slice/kubepods-pod<uid_>.slice` |
| systemd | Burstable / BestEffort | `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice` |

(`uid_`: the uid with `-` turned into `_`, as systemd unit names need.) The cgroup root is where cgroup2 is
mounted (`/sys/fs/cgroup` on a pure v2 host, `/sys/fs/cgroup/unified` on a hybrid one), or below it when the
kubelet runs with `--cgroup-root` or inside a container (kind: `/sys/fs/cgroup/kubelet.slice/...`); the
roots searched are $HEADRACE_POD_CGROUP_ROOTS (colon separated) if set, else every cgroup2 mount.

Pure path computation (`qos_class`, `relative_dirs`, `candidates`); `find` looks at the filesystem.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from node_agent.backends.ebpf import attach

GUARANTEED, BURSTABLE, BESTEFFORT = "guaranteed", "burstable", "besteffort"
QOS_CLASSES = (GUARANTEED, BURSTABLE, BESTEFFORT)
ROOTS_ENV = "HEADRACE_POD_CGROUP_ROOTS"
_RESOURCES = ("cpu", "memory")


def _valid_uid(uid: str) -> bool:
    return 0 < len(uid) <= 128 and all(c.isalnum() or c in "-_" for c in uid) and uid.isascii()


def relative_dirs(uid: str, qos: str, driver: str) -> tuple[str, ...]:
    """The pod-level directory below the cgroup root for one driver (`cgroupfs` or `systemd`)."""
    if not _valid_uid(uid):
        raise ValueError(f"pod uid {uid!r} cannot name a kubelet cgroup")
    if qos not in QOS_CLASSES:
        raise ValueError(f"unknown QoS class {qos!r} (one of {', '.join(QOS_CLASSES)})")
    if driver == "cgroupfs":
        return (f"kubepods/pod{uid}",) if qos == GUARANTEED else (f"kubepods/{qos}/pod{uid}",)
    if driver == "systemd":
        u = uid.replace("-", "_")
        if qos == GUARANTEED:
            return (f"kubepods.slice/kubepods-pod{u}.slice",)
        return (f"kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{u}.slice",)
    raise ValueError(f"unknown cgroup driver {driver!r} (cgroupfs or systemd)")


def candidates(uid: str, qos: str | None, roots: Iterable[Path]) -> list[Path]:
    """Every directory the pod's cgroup can be, both drivers, below each root; all QoS classes when the
    class is not known (the uid is unique: at most one of them exists)."""
    classes = (qos,) if qos else QOS_CLASSES
    return [
        root / rel
        for root in roots
        for driver in ("cgroupfs", "systemd")
        for q in classes
        for rel in relative_dirs(uid, q, driver)
    ]


def _quantity(value: Any) -> str | None:
    return str(value).strip() if isinstance(value, (str, int, float)) and str(value).strip() else None


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def qos_class(pod: Mapping[str, Any]) -> str:
    """A Pod object's QoS class: `status.qosClass` when set, else computed from its containers' resources
    as the kubelet does (Guaranteed: every container has cpu and memory limits, requests equal to them;
    BestEffort: no container requests or limits cpu or memory; else Burstable)."""
    given = _map(pod.get("status")).get("qosClass")
    if isinstance(given, str) and given.lower() in QOS_CLASSES:
        return given.lower()
    spec = _map(pod.get("spec"))
    containers: list[Mapping[str, Any]] = []
    for key in ("initContainers", "containers"):
        listed = spec.get(key)
        containers += [c for c in listed if isinstance(c, Mapping)] if isinstance(listed, list) else []
    any_set, guaranteed = False, bool(containers)
    for c in containers:
        res = _map(c.get("resources"))
        requests, limits = _map(res.get("requests")), _map(res.get("limits"))
        for name in _RESOURCES:
            req, lim = _quantity(requests.get(name)), _quantity(limits.get(name))
            any_set = any_set or req is not None or lim is not None
            if lim is None or (req is not None and req != lim):
                guaranteed = False
    if not any_set:
        return BESTEFFORT
    return GUARANTEED if guaranteed else BURSTABLE


def default_roots(environ: Mapping[str, str] | None = None, mountinfo: str | None = None) -> list[Path]:
    """$HEADRACE_POD_CGROUP_ROOTS (colon separated), else the cgroup2 mounts in `mountinfo`, or this
    process's (`attach.cgroup2_mounts`: read again only when the mount table changed)."""
    env = (os.environ if environ is None else environ).get(ROOTS_ENV, "")
    if env.strip():
        return [Path(p) for p in env.split(":") if p.strip()]
    try:
        mounts = attach.cgroup2_mounts() if mountinfo is None else attach.parse_cgroup2_mounts(mountinfo)
    except OSError:  # no /proc/self/mountinfo to read
        return []
    return list(dict.fromkeys(mounts))


def find(uid: str, qos: str | None = None, roots: Iterable[Path] | None = None) -> Path | None:
    """The existing pod-level cgroup v2 directory of the pod, or None."""
    try:
        paths = candidates(uid, qos, default_roots() if roots is None else roots)
    except ValueError:
        return None
    return next((p for p in paths if p.is_dir()), None)
