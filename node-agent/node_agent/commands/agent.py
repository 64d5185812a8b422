"""`headrace agent`: run the node agent."""

from __future__ import annotations

import sys
from typing import Any

import click

from node_agent.commands.agent_duty_flags import build_duties, duty_flags


@click.command("agent")
@click.option("--objects-dir", type=click.Path(file_okay=False), help="Pod source: a local objects dir (lab).")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), help="Pod source: the Kubernetes API.")
@click.option("--in-cluster", is_flag=True,
              help="Pod source: the Kubernetes API through this pod's service account (token refreshed).")
@click.option("--node-name", default="", help="This node's name (pods are watched by spec.nodeName).")
@click.option("--state-dir", default="/var/run/headrace", show_default=True,
              help="Pins (netns/), records (pods/) and default sockets.")
@click.option("--cni-socket", default=None, help="Plugin-event socket [default: STATE_DIR/cni.sock].")
@click.option("--proxy-socket", default=None, help="Node-proxy gRPC socket [default: STATE_DIR/proxy.sock].")
@click.option("--backend", type=click.Choice(["auto", "iptables", "nftables", "ebpf"]), default="auto",
              show_default=True)
@click.option("--iptables", "iptables_flavour", type=click.Choice(["auto", "legacy", "nft"]), default="auto",
              show_default=True, help="iptables flavour used in every pod (auto: detected once per node).")
@click.option("--metrics-addr", default="",
              help="HOST:PORT for /metrics, /healthz, /readyz ([::]:PORT or :PORT: every address, IPv4 and "
              "IPv6; off if empty).")
@click.option("--exclude-namespaces", default="kube-system", show_default=True,
              help="Comma-separated namespaces never touched.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.option("--drift-interval", type=float, default=1.0, show_default=True,
              help="Seconds between drift checks of enrolled pods that are polled (iptables-legacy, eBPF).")
@click.option("--drift-backstop", type=float, default=120.0, show_default=True,
              help="Seconds between full re-checks of every pod (nftables and iptables-nft pods are checked "
                   "when their netns announces an nf_tables or routing change).")
@click.option("--drift-events/--no-drift-events", default=True, show_default=True,
              help="Check nftables and iptables-nft pods on change (off: poll them every --drift-interval).")
@click.option("--cni-add-timeout", type=float, default=20.0, show_default=True,
              help="Longest an ADD waits for rules + proxy ack.")
@click.option("--proxy-cgroup", default=None, type=click.Path(file_okay=False),
              help="The node proxy's cgroup v2 directory (ambient over eBPF answers SO_ORIGINAL_DST there). "
                   "Default: learned from the proxy's connection; this overrides it.")
@click.option("--bpffs-dir", default=None, type=click.Path(file_okay=False),
              help="eBPF backend: keep the pins in this directory on the node's bpffs (e.g. /sys/fs/bpf/headrace), "
                   "bind-mounted at STATE_DIR/bpf, so that they outlive the agent's container and a restarted "
                   "agent adopts its pods as they are. Default: a bpffs of the agent's own mount namespace.")
@click.option("--capture-dns/--no-capture-dns", default=False, show_default=True,
              help="Also redirect ambient pods' DNS (UDP and TCP 53) to the node proxy's 15053.")
@click.option("--zds-socket", default="/var/run/ztunnel/ztunnel.sock", show_default=True,
              help="Also serve ztunnel's ZDS protocol on this SOCK_SEQPACKET socket (empty: off).")
@click.option("--owner-daemonset", default=None, metavar="NAME",
              help="On SIGTERM/SIGINT ask whether DaemonSet NAME (in --agent-namespace) is gone or being "
                   "deleted; if so, leave the node: the node's probe SNAT removed, and with --on-uninstall "
                   "release every ambient pod released. A rolling update or restart leaves all in place.")
@click.option("--agent-namespace", default="headrace-system", show_default=True, envvar="POD_NAMESPACE",
              help="The namespace of --owner-daemonset.")
@click.option("--on-uninstall", type=click.Choice(["keep", "release"]), default="keep", show_default=True,
              help="Ambient pods when the DaemonSet goes away: keep their redirection (fail closed) or "
                   "release them (rules out, proxy told, pins and records gone).")
@duty_flags  # --install-cni, --cni-*-dir, --cni-cleanup-on-exit, --repair-sidecars (agent/duties.py)
def agent(
    objects_dir: str | None,
    kubeconfig: str | None,
    in_cluster: bool,
    node_name: str,
    state_dir: str,
    cni_socket: str | None,
    proxy_socket: str | None,
    backend: str,
    iptables_flavour: str,
    metrics_addr: str,
    exclude_namespaces: str,
    log_level: str,
    drift_interval: float,
    drift_backstop: float,
    drift_events: bool,
    cni_add_timeout: float,
    proxy_cgroup: str | None,
    bpffs_dir: str | None,
    capture_dns: bool,
    zds_socket: str,
    owner_daemonset: str | None,
    agent_namespace: str,
    on_uninstall: str,
    **duty: Any,
) -> None:
    """Run the node agent (one per node)."""
    from node_agent.agent import log as agent_log
    from node_agent.agent.config import ConfigError, build_config

    try:
        config = build_config(
            objects_dir=objects_dir, kubeconfig=kubeconfig, node_name=node_name, state_dir=state_dir,
            cni_socket=cni_socket, proxy_socket=proxy_socket, backend=backend, iptables=iptables_flavour,
            metrics_addr=metrics_addr, exclude_namespaces=exclude_namespaces, log_level=log_level,
            drift_interval=drift_interval, drift_backstop=drift_backstop, drift_events=drift_events,
            cni_add_timeout=cni_add_timeout, proxy_cgroup=proxy_cgroup, bpffs_dir=bpffs_dir,
            capture_dns=capture_dns, zds_socket=zds_socket, in_cluster=in_cluster,
            owner_daemonset=owner_daemonset, agent_namespace=agent_namespace, on_uninstall=on_uninstall,
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    from node_agent.kernel.unix_socket import drop_early, listen_early

    listen_early(str(config.cni_socket), 128)  # ADDs wait in the backlog while the agent starts, never refused
    try:
        duties = build_duties(duty)
        if duties.install_cni and config.objects_dir is None and config.kubeconfig is None:
            raise click.UsageError("--install-cni needs a pod source for the plugin: --kubeconfig or --objects-dir "
                                   "(in a cluster, the install-cni container's --write-kubeconfig chains the plugin)")
    except BaseException:
        drop_early(str(config.cni_socket))
        raise
    agent_log.setup(config.log_level)
    from node_agent.agent.daemon import Agent
    from node_agent.agent.errors import AgentError

    try:
        sys.exit(Agent(config, duties=duties).run())
    except AgentError as exc:
        drop_early(str(config.cni_socket))  # not taken over: the agent never served
        raise click.ClickException(str(exc)) from exc
