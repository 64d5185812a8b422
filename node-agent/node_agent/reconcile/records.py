"""What the agent enrolled, persisted under <state-dir>/pods/<uid>.json so a restarted agent can adopt
(or clean up) every pod it touched: identity, pinned netns inode, IPs and backend."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from node_agent.install_cni.atomic import replace_file
from node_agent.netns.pin import check_uid


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


class RecordStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, uid: str) -> Path:
        return self.directory / f"{check_uid(uid)}.json"

    def save(self, rec: EnrolRecord) -> None:
        """Write the record atomically (a temporary file renamed over the old one); the directory is made
        when missing."""
        path = str(self._path(rec.uid))
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
        out: dict[str, EnrolRecord] = {}
        try:
            paths = sorted(self.directory.glob("*.json"))
        except FileNotFoundError:
            return out
        for path in paths:
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                rec = EnrolRecord(
                    uid=str(raw["uid"]),
                    namespace=str(raw["namespace"]),
                    name=str(raw["name"]),
                    netns_inode=int(raw["netns_inode"]),
                    ips=tuple(str(ip) for ip in raw.get("ips", ())),
                    backend=str(raw.get("backend", "")),
                    tcp_loose=int(raw["tcp_loose"]) if raw.get("tcp_loose") is not None else None,
                    cgroup_path=str(raw["cgroup_path"]) if raw.get("cgroup_path") else None,
                    mode=str(raw.get("mode") or "ambient"),
                    annotations=tuple((str(k), str(v)) for k, v in raw.get("annotations") or ()),
                    service_account=str(raw.get("service_account") or "default"),
                    leaving=str(raw.get("leaving") or ""),
                )
                if rec.mode not in ("ambient", "sidecar"):
                    continue
            except (OSError, ValueError, KeyError, TypeError):
                continue
            out[rec.uid] = rec
        return out
