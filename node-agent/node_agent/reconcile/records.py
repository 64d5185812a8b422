"""What the agent enrolled, persisted under <state-dir>/pods/<uid>.json so a restarted agent can adopt
(or clean up) every pod it touched: identity, pinned netns inode, IPs and backend (on disk an iptables
backend's name carries its flavour: `node_agent.backends.names`)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cni.contract.pod_uid import valid_uid
from node_agent.backends import names
from node_agent.install_cni.atomic import replace_file
from node_agent.netns.pin import check_uid

log = logging.getLogger("headrace.agent.reconcile")


@dataclass(frozen=True)
class EnrolRecord:
    uid: str
    namespace: str
    name: str
    netns_inode: int
    ips: tuple[str, ...]
    backend: str
    tcp_loose: int | None = None  # nf_conntrack_tcp_loose before enrolment (restored on removal)
    cgroup_path: str | None = None  # the pod's cgroup v2 directory (eBPF), when known
    mode: str = "ambient"  # "sidecar": a sidecar pod the plugin handed over (its spec from `annotations`)
    annotations: tuple[tuple[str, str], ...] = ()  # the traffic annotations the sidecar spec is built from
    service_account: str = "default"  # ambient: sent to the proxy with the workload (adoption re-sends it)
    leaving: str = ""  # a move in progress: the backend whose redirection is still in the pod beside backend's
    inbound: str = ""  # an eBPF ambient pod: the rules backend its inbound capture is on (written by the store)
    add_ips: tuple[str, ...] = ()  # the IPs the CNI ADD of the sandbox in netns_inode was answered with


class RecordStore:
    def __init__(self, directory: Path, iptables_flavour: str = "", ebpf_inbound: str = "") -> None:
        """iptables_flavour: the node's (`iptables` on disk as `iptables-<flavour>` and back; "" leaves
        names as they are). ebpf_inbound: the rules backend this node keeps eBPF ambient pods' inbound on
        (each such record says so: a pod recorded with another one has those rules moved)."""
        self.directory = directory
        self.iptables_flavour = iptables_flavour
        self.ebpf_inbound = ebpf_inbound

    def _path(self, uid: str) -> Path:
        return self.directory / f"{check_uid(uid)}.json"

    def save(self, rec: EnrolRecord) -> None:
        """Write the record atomically (a temporary file renamed over the old one); the directory is made
        when missing."""
        path = str(self._path(rec.uid))
        flavour = self.iptables_flavour
        inbound = self.ebpf_inbound if rec.backend == names.EBPF and rec.mode == "ambient" else ""
        rec = replace(rec, backend=names.recorded(rec.backend, flavour), leaving=names.recorded(rec.leaving, flavour),
                      inbound=names.recorded(inbound, flavour))
        data = json.dumps(asdict(rec), sort_keys=True).encode("utf-8")
        try:
            replace_file(path, data, f"{path}.tmp", 0o600)
        except FileNotFoundError:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            replace_file(path, data, f"{path}.tmp", 0o600)

    def delete(self, uid: str) -> None:
        try:
            self._path(uid).unlink()
        except FileNotFoundError:
            pass

    def load_all(self) -> dict[str, EnrolRecord]:
        """Every readable record by pod uid. One that cannot be used (not JSON, a field missing or of the
        wrong kind, an IP that is none, a uid that is not its file's name) is set aside as
        `<name>.unreadable` with a warning: it never stops an agent from starting, and is not read again.
        A write a killed agent left unfinished (`<name>.tmp`: its record is the one before) is removed."""
        out: dict[str, EnrolRecord] = {}
        try:
            paths = sorted(self.directory.glob("*.json"))
            unfinished = list(self.directory.glob("*.json.tmp"))
        except FileNotFoundError:
            return out
        for path in unfinished:
            with contextlib.suppress(OSError):
                path.unlink()
        for path in paths:
            try:
                rec = self._parse(json.loads(path.read_text(encoding="utf-8")), path.stem)
            except OSError as exc:
                log.warning("enrolment record %s unreadable: %s", path, exc, extra={"step": "adopt"})
                continue
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("enrolment record %s unusable, set aside: %s", path, exc or type(exc).__name__,
                            extra={"step": "adopt"})
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(path.name + ".unreadable"))
                continue
            out[rec.uid] = rec
        return out

    def _parse(self, raw: dict[str, Any], stem: str) -> EnrolRecord:
        uid = str(raw["uid"])
        if uid != stem or not valid_uid(uid):
            raise ValueError(f"uid {uid!r} is not the file's or not a pod uid")
        mode = str(raw.get("mode") or "ambient")
        if mode not in ("ambient", "sidecar"):
            raise ValueError(f"mode {mode!r}")
        inode = int(raw["netns_inode"])
        if inode < 0:
            raise ValueError(f"netns_inode {inode}")
        flavour = self.iptables_flavour
        return EnrolRecord(
            uid=uid,
            namespace=_text(raw["namespace"]),
            name=_text(raw["name"]),
            netns_inode=inode,
            ips=_ips(raw.get("ips")),
            backend=names.held(_text(raw.get("backend", "")), flavour),
            tcp_loose=int(raw["tcp_loose"]) if raw.get("tcp_loose") is not None else None,
            cgroup_path=_text(raw["cgroup_path"]) if raw.get("cgroup_path") else None,
            mode=mode,
            annotations=tuple((_text(k), _text(v)) for k, v in raw.get("annotations") or ()),
            service_account=_text(raw.get("service_account") or "default"),
            leaving=names.held(_text(raw.get("leaving") or ""), flavour),
            inbound=names.held(_text(raw.get("inbound") or ""), flavour),
            add_ips=_ips(raw.get("add_ips")),
        )


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


def _ips(value: object) -> tuple[str, ...]:
    """A list of IP addresses as written (each checked: a proxy and a pod's rules are given them)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise TypeError(f"IPs {value!r} are not a list")
    for ip in value:
        ipaddress.ip_address(_text(ip))
    return tuple(value)
