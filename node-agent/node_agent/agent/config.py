"""The node agent's settings: one validated, immutable object built from the command line."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

BackendSetting = Literal["auto", "iptables", "nftables", "ebpf"]
BACKEND_SETTINGS = ("auto", "iptables", "nftables", "ebpf")
IptablesSetting = Literal["auto", "legacy", "nft"]
OnUninstall = Literal["keep", "release"]
ON_UNINSTALL = ("keep", "release")

DEFAULT_STATE_DIR = Path("/var/run/headrace")
DEFAULT_ZDS_SOCKET = "/var/run/ztunnel/ztunnel.sock"  # where ztunnel looks for its node agent
DEFAULT_EXCLUDED_NAMESPACES = ("kube-system",)
LOG_LEVELS = ("debug", "info", "warning", "error")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class ConfigError(ValueError):
    """The settings are invalid; the message says which one and why."""


@dataclass(frozen=True)
class MetricsAddr:
    host: str
    port: int


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    cni_socket: Path
    proxy_socket: Path
    objects_dir: Path | None = None
    kubeconfig: Path | None = None
    in_cluster: bool = False  # the Kubernetes API through the pod's service account (token refreshed)
    node_name: str = ""
    backend: BackendSetting = "auto"
    iptables: IptablesSetting = "auto"
    metrics_addr: MetricsAddr | None = None
    exclude_namespaces: tuple[str, ...] = DEFAULT_EXCLUDED_NAMESPACES
    log_level: str = "info"
    drift_interval: float = 1.0  # seconds between checks of enrolled pods' rules (a bypass is repaired within 2 s)
    # pods whose backend announces changes (nftables, iptables-nft) are checked on change, and all every:
    drift_backstop: float = 120.0
    drift_events: bool = True  # False: every pod polled every drift_interval
    cni_add_timeout: float = 20.0  # an ADD waits this long for rules + proxy ack
    ack_timeout: float = 15.0
    agent_id: str = field(default="")
    proxy_cgroup: Path | None = None  # the node proxy's cgroup v2 dir (ambient over eBPF)
    bpffs_dir: Path | None = None  # eBPF pins kept there, on the node's bpffs; None: in a bpffs of the agent's own
    capture_dns: bool = False  # ambient pods' DNS (UDP and TCP 53) to the node proxy's 15053
    zds_socket: Path | None = None  # ztunnel's ZDS socket (SOCK_SEQPACKET); None: not served
    # at SIGTERM, is this DaemonSet (in agent_namespace) going away? Then the agent leaves the node (uninstall.py)
    owner_daemonset: str | None = None
    agent_namespace: str = "headrace-system"
    on_uninstall: OnUninstall = "keep"  # ambient pods when leaving: keep their redirection, or release them

    @property
    def netns_dir(self) -> Path:
        return self.state_dir / "netns"

    @property
    def pods_dir(self) -> Path:
        return self.state_dir / "pods"


def parse_metrics_addr(value: str) -> MetricsAddr | None:
    """`host:port`, `[v6]:port`, or `:port` (all interfaces: `::`, which listens dual-stack, IPv4 too);
    empty or `off` disables metrics."""
    value = value.strip()
    if value in ("", "off", "none"):
        return None
    host, sep, port_s = value.rpartition(":")
    if not sep or not port_s.isdigit():
        raise ConfigError(f"--metrics-addr {value!r}: expected HOST:PORT")
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ConfigError(f"--metrics-addr {value!r}: port out of range")
    host = host.strip("[]") or "::"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(f"--metrics-addr {value!r}: host must be an IP address or localhost") from None
    return MetricsAddr(host, port)


def parse_namespaces(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else [x for v in value for x in v.split(",")]
    out: list[str] = []
    for raw in items:
        name = raw.strip()
        if not name:
            continue
        if not _DNS_LABEL.match(name):
            raise ConfigError(f"--exclude-namespaces: {name!r} is not a valid namespace name")
        if name not in out:
            out.append(name)
    return tuple(out)


def build_config(
    *,
    objects_dir: str | Path | None = None,
    kubeconfig: str | Path | None = None,
    node_name: str | None = None,
    state_dir: str | Path | None = None,
    cni_socket: str | Path | None = None,
    proxy_socket: str | Path | None = None,
    backend: str = "auto",
    iptables: str = "auto",
    metrics_addr: str = "",
    exclude_namespaces: str | tuple[str, ...] | list[str] = DEFAULT_EXCLUDED_NAMESPACES,
    log_level: str = "info",
    drift_interval: float = 1.0,
    cni_add_timeout: float = 20.0,
    drift_backstop: float = 120.0,
    drift_events: bool = True,
    proxy_cgroup: str | Path | None = None,
    bpffs_dir: str | Path | None = None,
    capture_dns: bool = False,
    zds_socket: str | Path | None = None,
    in_cluster: bool = False,
    owner_daemonset: str | None = None,
    agent_namespace: str = "headrace-system",
    on_uninstall: str = "keep",
) -> AgentConfig:
    """Validate everything the agent needs before it starts; raise ConfigError with a clear message."""
    if [objects_dir is not None, kubeconfig is not None, in_cluster].count(True) != 1:
        raise ConfigError("give exactly one pod source: --objects-dir DIR, --kubeconfig FILE --node-name N "
                          "or --in-cluster --node-name N")
    if in_cluster and not (node_name or "").strip():
        raise ConfigError("--in-cluster needs --node-name (the pods of this node are watched)")
    node = (node_name or "").strip()
    odir: Path | None = None
    kcfg: Path | None = None
    if objects_dir is not None:
        odir = Path(objects_dir)
        if not odir.is_dir():
            raise ConfigError(f"--objects-dir {str(odir)!r} is not a directory")
    if kubeconfig is not None:
        kcfg = Path(kubeconfig)
        if not kcfg.is_file():
            raise ConfigError(f"--kubeconfig {str(kcfg)!r} does not exist")
        if not node:
            raise ConfigError("--kubeconfig needs --node-name (the pods of this node are watched)")
    if node and not _DNS_SUBDOMAIN.match(node):
        raise ConfigError(f"--node-name {node!r} is not a valid node name")
    if backend not in BACKEND_SETTINGS:
        raise ConfigError(f"--backend {backend!r}: expected auto, iptables, nftables or ebpf")
    if iptables not in ("auto", "legacy", "nft"):
        raise ConfigError(f"--iptables {iptables!r}: expected auto, legacy or nft")
    level = log_level.lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"--log-level {log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
    for name, val in (("drift", drift_interval), ("cni-add", cni_add_timeout), ("drift-backstop", drift_backstop)):
        if not 0 < val <= 3600:
            raise ConfigError(f"{name} interval/timeout {val!r} must be in (0, 3600] seconds")
    sdir = Path(state_dir) if state_dir is not None else DEFAULT_STATE_DIR
    if not sdir.is_absolute():
        sdir = sdir.resolve()
    csock = Path(cni_socket) if cni_socket is not None else sdir / "cni.sock"
    psock = Path(proxy_socket) if proxy_socket is not None else sdir / "proxy.sock"
    # ztunnel's socket: the default path unless given; empty turns the ZDS server off
    zsock: Path | None = Path(DEFAULT_ZDS_SOCKET if zds_socket is None else zds_socket)
    if zds_socket is not None and not str(zds_socket):
        zsock = None
    if zsock is not None and not zsock.is_absolute():
        zsock = zsock.resolve()
    named = [("--cni-socket", csock), ("--proxy-socket", psock)] + ([("--zds-socket", zsock)] if zsock else [])
    for flag, sock in named:
        if len(str(sock).encode()) > 107:
            raise ConfigError(f"{flag} {str(sock)!r}: unix socket paths must be under 108 bytes")
    if len({p for _, p in named}) != len(named):
        raise ConfigError("--cni-socket, --proxy-socket and --zds-socket must differ")
    pcg: Path | None = None
    if proxy_cgroup:
        pcg = Path(proxy_cgroup)
        if not pcg.is_absolute() or not (pcg / "cgroup.procs").is_file():
            raise ConfigError(f"--proxy-cgroup {str(pcg)!r} is not a cgroup directory (absolute path expected)")
    owner = _owner(owner_daemonset, agent_namespace, on_uninstall, kube=objects_dir is None)
    pins = _bpffs_dir(bpffs_dir, sdir)
    return AgentConfig(
        state_dir=sdir,
        cni_socket=csock,
        proxy_socket=psock,
        objects_dir=odir,
        kubeconfig=kcfg,
        in_cluster=in_cluster,
        node_name=node,
        backend=backend,  # type: ignore[arg-type]
        iptables=iptables,  # type: ignore[arg-type]
        metrics_addr=parse_metrics_addr(metrics_addr),
        exclude_namespaces=parse_namespaces(exclude_namespaces),
        log_level=level,
        drift_interval=drift_interval,
        drift_backstop=drift_backstop,
        drift_events=drift_events,
        cni_add_timeout=cni_add_timeout,
        agent_id=f"headrace-agent-{node or 'local'}",
        proxy_cgroup=pcg,
        bpffs_dir=pins,
        capture_dns=capture_dns,
        zds_socket=zsock,
        owner_daemonset=owner,
        agent_namespace=agent_namespace,
        on_uninstall=on_uninstall,  # type: ignore[arg-type]
    )


def _bpffs_dir(value: str | Path | None, state_dir: Path) -> Path | None:
    """--bpffs-dir: an absolute path outside the state dir (it is bind-mounted at <state-dir>/bpf); whether
    it is on a bpffs is the backend's question (without one it warns and keeps the pins in its own)."""
    if not value:
        return None
    path = Path(value)
    if not path.is_absolute():
        raise ConfigError(f"--bpffs-dir {str(path)!r}: an absolute path is expected (e.g. /sys/fs/bpf/headrace)")
    if path == state_dir or state_dir in path.parents:
        raise ConfigError(f"--bpffs-dir {str(path)!r} is inside --state-dir: give a directory on the node's bpffs "
                          "(e.g. /sys/fs/bpf/headrace)")
    return path


def _owner(daemonset: str | None, namespace: str, on_uninstall: str, *, kube: bool) -> str | None:
    """The DaemonSet asked about at SIGTERM (None: never asked, the agent always leaves pods and node as
    they are), checked with what goes with it."""
    if on_uninstall not in ON_UNINSTALL:
        raise ConfigError(f"--on-uninstall {on_uninstall!r}: expected keep or release")
    if not _DNS_LABEL.match(namespace):
        raise ConfigError(f"--agent-namespace {namespace!r} is not a valid namespace name")
    name = (daemonset or "").strip()
    if not name:
        if on_uninstall == "release":
            raise ConfigError("--on-uninstall release needs --owner-daemonset (to tell an uninstall from a restart)")
        return None
    if not _DNS_SUBDOMAIN.match(name):
        raise ConfigError(f"--owner-daemonset {name!r} is not a valid DaemonSet name")
    if not kube:
        raise ConfigError("--owner-daemonset needs the Kubernetes API as pod source (--kubeconfig or --in-cluster)")
    return name
