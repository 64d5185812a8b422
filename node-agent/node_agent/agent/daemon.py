"""The node agent: wires the pod source, reconciler, proxy hub, plugin-event server and HTTP endpoints.

Shutdown (SIGTERM/SIGINT) stops serving and watching but leaves every pod's rules, pins and records in
place: traffic of enrolled pods must not bypass the proxy because the agent restarts. The next agent
adopts them. Only when its DaemonSet goes away (`--owner-daemonset`) does the agent leave the node
(agent/uninstall.py).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from cni.contract.spec import AmbientSpec
from cni.kernel import flavour as flavour_mod
from cni.kernel import spawn
from cni.kernel.flavour import Flavour
from node_agent.agent import node_rules as probe_snat
from node_agent.agent import uninstall
from node_agent.agent.config import AgentConfig
from node_agent.agent.duties import AgentDuties, DutyOptions
from node_agent.agent.errors import AgentError
from node_agent.backends import names
from node_agent.backends.base import BackendError, InboundOnRules, Prepares, RedirectBackend
from node_agent.backends.ebpf.backend import EbpfBackend
from node_agent.backends.iptables.in_process_commands import IN_PROCESS, RESTORES
from node_agent.backends.select import ambient_inbound_rules, rules_backend_setting, select_backend
from node_agent.kernel.netns_spawn import InNetnsSpawner
from node_agent.netns.pin import NetnsPins
from node_agent.proxy.cgroup import Source as CgroupSource
from node_agent.proxy.cgroup_follow import ProxyCgroupFollower, saved_proxy_cgroup
from node_agent.proxy.hub import ProxyHub
from node_agent.reconcile.gate import AdoptionGate
from node_agent.reconcile.loop import Reconciler
from node_agent.reconcile.records import RecordStore
from node_agent.reconcile.state import Hub
from node_agent.serve.cni_server import CniServer
from node_agent.serve.health import HealthServer
from node_agent.serve.metrics import AgentMetrics
from node_agent.serve.plugin_logs import PluginLogListener
from node_agent.serve.plugin_logs import socket_path as plugin_log_socket
from node_agent.serve.proxy_metrics import ProxyProtocolCollector
from node_agent.serve.relayed_del import RelayedDel
from node_agent.serve.warm_add import WarmAdd, pod_lookup
from node_agent.sources.redirection_mark import RedirectionMarker, Writer
from node_agent.sources.store import PodStore

log = logging.getLogger("headrace.agent")


class Source(Protocol):
    def start(self) -> None: ...
    def stop(self, timeout: float = 5.0) -> None: ...


def resolve_flavour(setting: str) -> Flavour:
    """The iptables flavour for every pod on this node: detected once (`auto`) or forced."""
    return flavour_mod.resolve(setting)


def make_backend(config: AgentConfig, flavour: str) -> RedirectBackend:
    """The node's backend (node_agent.backends.select); AgentError when it cannot run here."""
    try:
        choice = select_backend(config.backend, state_dir=config.state_dir, iptables_flavour=flavour,
                                proxy_cgroup=config.proxy_cgroup, bpffs_dir=config.bpffs_dir)
    except BackendError as exc:
        raise AgentError(str(exc)) from exc
    log.info("backend: %s", choice.reason, extra={"step": "backend", "backend": choice.backend.name})
    return choice.backend


def make_hub(config: AgentConfig, gate: AdoptionGate | None = None) -> Hub:
    """The gRPC hub, and beside it the ZDS server for ztunnel unless --zds-socket is empty; neither sends a
    snapshot before the gate opens (adoption complete)."""
    grpc_hub = ProxyHub(str(config.proxy_socket), config.agent_id, snapshot_gate=gate,
                        ack_timeout=config.ack_timeout)
    if config.zds_socket is None:
        return grpc_hub
    from node_agent.proxy.hub_fanout import HubFanout
    from node_agent.proxy.zds_server import ZdsHub

    return HubFanout(grpc_hub, ZdsHub(str(config.zds_socket), snapshot_gate=gate), names=("grpc", "zds"))


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        backend: RedirectBackend | None = None,
        hub: Hub | None = None,
        source_factory: Callable[[PodStore], Source] | None = None,
        node_rules: Callable[[list[str]], None] | None = None,
        duties: DutyOptions | None = None,
    ) -> None:
        self.config = config
        self.store = PodStore()
        injected = backend is not None and node_rules is not None
        self.flavour: str = config.iptables if injected else resolve_flavour(config.iptables)
        # the proxy cgroup a previous agent learned (no --proxy-cgroup): the backend starts from it
        self._restored_proxy_cgroup = None if config.proxy_cgroup else saved_proxy_cgroup(self.proxy_cgroup_file)
        self.backend = backend if backend is not None else make_backend(
            replace(config, proxy_cgroup=config.proxy_cgroup or self._restored_proxy_cgroup), self.flavour)
        fallback: RedirectBackend | None = None
        # eBPF node: iptables serves the pods eBPF cannot (fallback_reason, e.g. ambient without a known
        # proxy cgroup); with `auto` also the pods whose cgroup is unknown (`ebpf` fails those closed)
        if backend is None and self.backend.name == "ebpf":
            fallback = make_backend(replace(config, backend=rules_backend_setting()), self.flavour)
        factory = self._other_backend if backend is None else None
        # proxies get no snapshot before adoption has rebuilt the desired set (reconcile.gate)
        self.adoption_gate = AdoptionGate()
        self.hub: Hub = hub if hub is not None else make_hub(config, self.adoption_gate)
        self.metrics = AgentMetrics(lambda: bool(self.hub.connected))
        self.metrics.registry.register(ProxyProtocolCollector(self.hub.status))
        self.pins = NetnsPins(config.netns_dir)
        self.records = RecordStore(config.pods_dir, self.flavour, "" if injected else self._ebpf_inbound())
        self.node_rules_kind = ""  # set by _node_rules: other kinds' probe SNAT is cleared at start
        rules, announce = (node_rules, True) if node_rules is not None else self._node_rules()
        self.reconciler = Reconciler(
            self.store, self.backend, self.hub, self.pins, self.records,
            exclude_namespaces=config.exclude_namespaces, node_rules=rules, node_rules_announce=announce,
            metrics=self.metrics,
            node_name=config.node_name, drift_interval=config.drift_interval, fallback=fallback,
            drift_backstop=config.drift_backstop, drift_events=config.drift_events,
            cgroup_fallback=config.backend == "auto", backend_factory=factory,
            spec=AmbientSpec(capture_dns=config.capture_dns), adoption_gate=self.adoption_gate,
        )
        self.metrics.watch_pods_without_proxy(self.reconciler.enrolled_without_proxy)
        self.metrics.watch_drift_events(self.reconciler.drift.watch_counts)
        self.proxy_cgroups = self._proxy_cgroup_follower()
        self._annotation_writer: Writer | None = None  # set by the default sources
        self.source: Source = (source_factory or self._default_source)(self.store)
        self.marker = self._redirection_marker()
        self.duties = AgentDuties(self, duties)  # install-cni in the agent, boot-race monitor
        view = self.duties.status_view(self.reconciler)
        lookup = pod_lookup(str(config.kubeconfig) if config.kubeconfig else None,
                            str(config.objects_dir) if config.objects_dir else None)
        self.warm_add = WarmAdd(
            self.store, view, self.reconciler.table, self.reconciler.backends, self.reconciler.plugin_sidecars,
            lookup=lookup, add_timeout=config.cni_add_timeout,
        )
        self.relayed_del = RelayedDel(self.store, view, self.reconciler.table, lookup=lookup)
        self.metrics.watch_plugin_adds(self.warm_add.counts)
        self.metrics.watch_plugin_dels(self.relayed_del.counts)
        self.cni = CniServer(
            str(config.cni_socket), view, add_timeout=config.cni_add_timeout,
            resolve_uid=self._resolve_uid, extra_status=self._extra_status, warm_add=self.warm_add.add,
            relayed_del=self.relayed_del,
        )
        self.metrics.watch_plugin_admission(self.cni.admission.counts)
        self.health: HealthServer | None = None
        self._spawner: spawn.Runner = spawn.Spawner()  # the runner start() replaced, put back by stop()
        self.plugin_logs = PluginLogListener(plugin_log_socket(self.config.state_dir))
        self._stopped = threading.Event()
        self.owner = uninstall.owner_check(config)  # is the DaemonSet going away? (--owner-daemonset)

    def _default_source(self, store: PodStore) -> Source:
        if self.config.objects_dir is not None:
            from node_agent.sources.objects_dir import ObjectsDirSource
            from node_agent.sources.objects_write import sweep_unfinished, write_pod_annotation

            objects_dir = self.config.objects_dir
            objects = ObjectsDirSource(store, objects_dir, self.config.node_name)
            for name in sweep_unfinished(objects_dir):
                log.info("unfinished annotation write removed: %s", name, extra={"step": "objects-dir", "file": name})

            def write(namespace: str, name: str, enabled: bool) -> None:
                write_pod_annotation(objects_dir, namespace, name, enabled, objects.file_of(namespace, name))

            self._annotation_writer = write
            return objects
        from node_agent.sources.kubernetes import KubernetesSource

        source = KubernetesSource(store, self.config.kubeconfig, self.config.node_name)  # None: in-cluster
        self._annotation_writer = source.patch_redirection
        self.metrics.watch_kube_source(source.figures)  # watched by alerts, not by readiness
        return source

    def _redirection_marker(self) -> RedirectionMarker | None:
        """`ambient.istio.io/redirection: enabled` on enrolled ambient pods (sources/redirection_mark.py)."""
        if self._annotation_writer is None:
            return None
        # ready once a pass saw every pod and namespace: before, an ambient pod whose namespace is not listed
        # yet is not held, and its annotation would be taken off (and the earlier agent's mark lost with it)
        marker = RedirectionMarker(self.reconciler.status, lambda: self.store.snapshot().pods,
                                   lambda: self.reconciler.synced_passes > 0, self._annotation_writer)
        self.store.subscribe(marker.wake, quiet=True)  # its own write-backs, and anyone else's edits
        self.reconciler.board.subscribe(marker.wake)  # a pod enrolled or gone: write at once
        return marker

    def _node_rules(self) -> tuple[Callable[[list[str]], None], bool]:
        """The node-side probe SNAT: nftables on a node without iptables (or with the nftables backend);
        and whether its changes are announced (nf_tables: nftables or iptables-nft, not iptables-legacy)."""
        nft = self.backend.name == "nftables" or rules_backend_setting() == "nftables"
        self.node_rules_kind = probe_snat.kind(nft, self.flavour)
        sync = probe_snat.make(self.node_rules_kind)
        quiet = getattr(self.backend, "quiet", None)  # a legacy node's x_tables change count (IptablesBackend)
        if self.node_rules_kind == "iptables-legacy" and quiet is not None:
            sync = probe_snat.unless_unchanged(sync, quiet.read)
        return sync, probe_snat.announced(self.node_rules_kind)

    def _clear_other_node_rules(self) -> None:
        """Once the first pass has written the node's own kind of probe SNAT (for the pods enrolled by then):
        take out any other kind an earlier agent left."""
        deadline = time.monotonic() + 30.0
        while not self.reconciler.passes and time.monotonic() < deadline:
            time.sleep(0.1)
        probe_snat.clear_others(self.node_rules_kind)

    def _ebpf_inbound(self) -> str:
        """The rules backend eBPF ambient pods' inbound is on here: the node's eBPF backend's, or what a
        retired one (`_other_backend`) would use."""
        rules = self.backend.rules_inbound(AmbientSpec()) if isinstance(self.backend, InboundOnRules) else None
        return rules.name if rules is not None else rules_backend_setting()

    def _other_backend(self, name: str) -> RedirectBackend | None:
        """A backend that is not this node's any more (agent restarted with another --backend or iptables
        flavour: `iptables-legacy`, `iptables-nft`, see backends.names): to remove what it left in a pod
        when the pod moves to the node's backend (a sidecar pod keeps it)."""
        # iptables of the node's flavour, or of another (pods recorded before the flavour changed)
        flavour = self.flavour if name == names.IPTABLES else names.flavour_named(name)
        if flavour is not None:
            other = make_backend(replace(self.config, backend="iptables"), flavour)
            other.name = name
            return other
        if name == "nftables":
            return make_backend(replace(self.config, backend="nftables"), self.flavour)
        if name == "ebpf":  # with its ambient inbound's rules backend: a move takes those rules out too
            return EbpfBackend(self.config.state_dir, proxy_cgroup=self.proxy_cgroups.path,
                               ambient_inbound=ambient_inbound_rules(self.flavour), bpffs_dir=self.config.bpffs_dir)
        return None

    def _proxy_cgroup_follower(self) -> ProxyCgroupFollower:
        """The node proxy's cgroup (ambient over eBPF): --proxy-cgroup, else learned from the proxy's
        connections (proxy/cgroup_follow.py) and handed to the backend's set_proxy_cgroup. A backend that
        needs no cgroup gets nothing: the detection is only reported."""
        needed = self.backend.needs_cgroup
        follower = ProxyCgroupFollower(self.backend.set_proxy_cgroup if needed else None, self.config.proxy_cgroup,
                                       on_change=self._proxy_cgroup_changed, state_file=self.proxy_cgroup_file,
                                       restored=self._restored_proxy_cgroup if needed else None)
        self.metrics.proxy_cgroup_source(follower.source)
        self.hub.add_peer_listener(follower.observe)
        return follower

    @property
    def proxy_cgroup_file(self) -> Path:
        return self.config.state_dir / "proxy-cgroup"

    def _proxy_cgroup_changed(self, source: CgroupSource) -> None:
        self.metrics.proxy_cgroup_source(source)
        self.reconciler.rechoose_backends()  # enrolled pods move backend if the choice changed

    def _resolve_uid(self, namespace: str, name: str) -> str | None:
        for pod in self.store.snapshot().pods.values():
            if pod.namespace == namespace and pod.name == name:
                return pod.uid
        return None

    def _extra_status(self) -> dict[str, Any]:
        return {"backend": self.backend.name, "node": self.config.node_name, "proxy": self.hub.status(),
                "synced": self.store.synced, "proxy_cgroup": self.proxy_cgroups.status()}

    def healthz(self) -> tuple[bool, str]:
        last = self.reconciler.last_pass
        if self.reconciler.passes and time.time() - last > 30:
            return False, f"reconcile loop stalled ({time.time() - last:.0f}s since the last pass)"
        return True, "ok"

    def readyz(self) -> tuple[bool, str]:
        if not self.store.synced:
            return False, "pod source not synced yet"
        if not self.cni.listening:
            return False, "plugin-event socket not listening"
        if not self.reconciler.passes:
            return False, "first reconcile pass not done"
        return True, "ready"

    def start(self) -> None:
        os.makedirs(self.config.state_dir, mode=0o755, exist_ok=True)
        self.pins.ensure_dir()
        # commands in a pod netns without nsenter; some done in-process
        self._spawner = spawn.install_runner(InNetnsSpawner(IN_PROCESS, RESTORES))
        self.hub.start()
        if isinstance(self.backend, Prepares):  # e.g. the eBPF node maps and programs, before the first pod
            threading.Thread(target=self._prepare, args=(self.backend,), name="headrace-backend-prepare",
                             daemon=True).start()
        if self.node_rules_kind:  # what an agent with another backend or flavour left on the node
            threading.Thread(target=self._clear_other_node_rules, name="node-rules-cleanup", daemon=True).start()
        self.reconciler.start()
        self.source.start()
        if self.marker is not None:
            self.marker.start()
        self.plugin_logs.start()  # the plugin's log lines, into this agent's log
        self.cni.start()
        if self.owner is not None:
            self.owner.start()
        self.duties.start()  # after the socket listens: the plugin is chained only once we can answer it
        if self.config.metrics_addr is not None:
            self.health = HealthServer(self.config.metrics_addr.host, self.config.metrics_addr.port,
                                       self.metrics.registry, self.healthz, self.readyz)
            self.health.start()
        log.info("agent started", extra={"step": "start", "backend": self.backend.name,
                                         "state_dir": str(self.config.state_dir), "flavour": self.flavour})

    def _prepare(self, backend: Prepares) -> None:
        """The backend's node-wide pieces (after a first compile, for eBPF); then pods the fallback took
        meanwhile (the programs not compiled yet) move to the node's backend, as the next pass chooses."""
        backend.prepare()
        self.reconciler.rechoose_backends()

    def stop(self, leave: bool = False) -> None:
        """Clean shutdown: stop serving; leave pods' rules, pins and records in place. `leave`: the DaemonSet
        goes away, so the agent leaves the node (uninstall.py) before the proxy connection closes."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.duties.stop(leaving=leave)  # first: an entry that leaves (--cni-cleanup-on-exit, or the DaemonSet
        # going away) does so before the socket closes
        self.cni.stop()
        if self.marker is not None:
            self.marker.stop()
        self.plugin_logs.stop()
        self.reconciler.stop()
        if leave:  # the source's API client still open for the annotations
            self._leave_node()
        self.source.stop()
        self.hub.stop()
        if self.health is not None:
            self.health.stop()
        self.reconciler.close_backends()
        spawn.install_runner(self._spawner)
        log.info("agent stopped; the node left" if leave else "agent stopped; pod rules left in place",
                 extra={"step": "stop"})

    def _leave_node(self) -> None:
        """The DaemonSet goes away (uninstall.py); whatever fails, the rest of the shutdown follows."""
        release = self.config.on_uninstall == "release"
        try:
            uninstall.leave_node(partial(self.reconciler.release_ambient, "the DaemonSet goes away") if release
                                 else None, self._annotation_writer,
                                 partial(self.reconciler.table.forget_all, "left with its rules in place", "leave"),
                                 probe_snat.clear_all if self.node_rules_kind else list)  # (injected: not ours)
        except Exception:
            log.exception("leaving the node failed", extra={"step": "uninstall"})

    def run(self) -> int:
        done = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: shutting down", signum, extra={"step": "signal"})
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        while not done.wait(1.0):
            pass
        self.stop(leave=uninstall.going_away(self.config, self.owner))
        return 0
