"""`headrace install-cni` and `headrace uninstall-cni`."""

from __future__ import annotations

import json
import signal
import sys
import threading
from types import FrameType
from typing import Any

import click

from cni.plugin.launch import DEFAULT_AGENT_SOCKET


def _path_options(f: Any) -> Any:
    f = click.option(
        "--host-root", default="/", show_default=True, envvar="HEADRACE_HOST_ROOT",
        help="Where the host's / is mounted in this process (e.g. /host in the DaemonSet). The other "
        "paths are host paths; they are also what gets written into the launcher and the conflist.",
    )(f)
    f = click.option("--install-dir", default="/opt/headrace", show_default=True,
                     help="Host dir for the plugin's self-contained runtime and install state.")(f)
    f = click.option("--cni-bin-dir", default="/opt/cni/bin", show_default=True,
                     help="Host CNI plugin dir (the headrace-cni launcher goes here).")(f)
    f = click.option("--cni-conf-dir", default="/etc/cni/net.d", show_default=True,
                     help="Host CNI config dir (the primary config gets our entry).")(f)
    return f


def _split_namespaces(values: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for v in values:
        out.extend(n.strip() for n in v.split(",") if n.strip())
    return tuple(out)


@click.command("install-cni")
@_path_options
@click.option("--agent-socket", default=DEFAULT_AGENT_SOCKET, show_default=True,
              help="Agent plugin-event socket, written into the entry.")
@click.option("--backend", type=click.Choice(["auto", "iptables", "nftables", "ebpf"]), default="auto",
              show_default=True)
@click.option("--iptables", "iptables_mode", type=click.Choice(["auto", "legacy", "nft"]), default="auto",
              show_default=True)
@click.option("--objects-dir", default=None, help="Pod source for the plugin: a local objects dir (lab).")
@click.option("--kubeconfig", default=None, help="Pod source for the plugin: a kubeconfig (host path).")
@click.option("--write-kubeconfig", is_flag=True,
              help="Write INSTALL_DIR/kubeconfig from this pod's service account (kept fresh with --watch) "
              "and use it as the plugin's pod source.")
@click.option("--service-account-dir", default="/var/run/secrets/kubernetes.io/serviceaccount", show_default=True)
@click.option("--exclude-namespaces", multiple=True, default=("kube-system",), show_default=True,
              help="Namespaces the plugin never redirects (comma list, repeatable).")
@click.option("--agent-namespace", default="headrace-system", show_default=True, envvar="POD_NAMESPACE",
              help="The agent's namespace; always added to exclude_namespaces (never block the agent).")
@click.option("--log-file", default="/var/run/headrace/cni.log", show_default=True)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.option("--skip-plugin", is_flag=True, help="Only chain the conflist entry; do not install the plugin.")
@click.option("--skip-config", is_flag=True,
              help="Install the plugin (and kubeconfig) only; leave the CNI config alone (init container).")
@click.option("--wait-for-agent", is_flag=True,
              help="With --watch: chain the entry only once the agent socket exists.")
@click.option("--watch", is_flag=True,
              help="Keep running: re-insert the entry when the config is rewritten; wait for a config.")
@click.option("--check", is_flag=True,
              help="Only check (a readiness probe): exit 0 when our entry ends the primary CNI config and the "
              "launcher is installed, 1 otherwise.")
@click.option("--uninstall-on-exit", is_flag=True, help="With --watch: uninstall on SIGTERM/SIGINT.")
@click.option("--owner-daemonset", default=None, metavar="NAME",
              help="With --watch: on SIGTERM/SIGINT, uninstall only if DaemonSet NAME (in --agent-namespace) "
              "is gone or being deleted; keep everything on a rolling update. Needs a kubeconfig "
              "(--write-kubeconfig or --kubeconfig) allowed to get that DaemonSet.")
def install_cni(
    host_root: str, install_dir: str, cni_bin_dir: str, cni_conf_dir: str, agent_socket: str, backend: str,
    iptables_mode: str, objects_dir: str | None, kubeconfig: str | None, write_kubeconfig: bool,
    service_account_dir: str, exclude_namespaces: tuple[str, ...],
    agent_namespace: str, log_file: str, log_level: str, skip_plugin: bool, skip_config: bool,
    wait_for_agent: bool, watch: bool,
    uninstall_on_exit: bool, owner_daemonset: str | None, check: bool,
) -> None:
    """Install the plugin and chain it at the end of the node's primary CNI config."""
    if check:
        _check(host_root, cni_conf_dir, cni_bin_dir)
        return
    from node_agent.install_cni import service
    from node_agent.install_cni.conflist import ConfigError
    from node_agent.install_cni.kubeconfig import KubeconfigError
    from node_agent.install_cni.runtime import RuntimeInstallError
    from node_agent.install_cni.settings import PluginSettings, SettingsError

    if owner_daemonset is not None and not (watch and (write_kubeconfig or kubeconfig)):
        raise click.UsageError("--owner-daemonset needs --watch and --write-kubeconfig or --kubeconfig")
    if uninstall_on_exit and owner_daemonset is not None:
        raise click.UsageError("give --uninstall-on-exit (always) or --owner-daemonset (when deleted), not both")
    if write_kubeconfig:
        if kubeconfig or objects_dir:
            raise click.UsageError("--write-kubeconfig replaces --kubeconfig and --objects-dir")
        kubeconfig = f"{install_dir.rstrip('/')}/kubeconfig"
    elif not (kubeconfig or objects_dir or skip_config):  # the plugin would refuse every ADD and DEL
        raise click.UsageError("the plugin needs a pod source: --write-kubeconfig (in a cluster), --kubeconfig "
                               "or --objects-dir")
    try:
        settings = PluginSettings(
            agent_socket=agent_socket, backend=backend, iptables=iptables_mode, objects_dir=objects_dir,
            kubeconfig=kubeconfig, exclude_namespaces=_split_namespaces(exclude_namespaces),
            agent_namespace=agent_namespace, log_file=log_file, log_level=log_level,
        )
        opts = service.InstallOptions(
            cni_conf_dir=cni_conf_dir, cni_bin_dir=cni_bin_dir, install_dir=install_dir, host_root=host_root,
            install_plugin=not skip_plugin, settings=settings,
            service_account_dir=service_account_dir if write_kubeconfig else None,
            wait_for_agent=wait_for_agent,
        )
        service.remove_stale_temps(opts)
        service.install_plugin_files(opts)
        if skip_config:
            service.write_kubeconfig(opts)
            return
    except (SettingsError, RuntimeInstallError, KubeconfigError) as exc:
        raise click.ClickException(str(exc)) from exc

    if not watch:
        try:
            change = service.ensure_config(opts)
        except ConfigError as exc:
            raise click.ClickException(f"refusing to change the CNI config: {exc}") from exc
        except KubeconfigError as exc:
            raise click.ClickException(str(exc)) from exc
        if change.action == "no-config":
            raise click.ClickException(f"no CNI config found in {cni_conf_dir} (use --watch to wait for one)")
        click.echo(json.dumps(change.as_dict()))
        return

    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    service.log("info", "watching", dir=cni_conf_dir)
    checker = service.owner_check(opts, owner_daemonset) if owner_daemonset is not None else None
    if checker is not None:
        checker.start()  # the DaemonSet seen present: a 404/401/403 at termination then means uninstall
    service.watch(opts, stop)
    if uninstall_on_exit:
        service.uninstall(opts)
    elif owner_daemonset is not None and checker is not None:
        service.uninstall_if_owner_gone(opts, owner_daemonset, checker)
    sys.exit(0)


def _check(host_root: str, cni_conf_dir: str, cni_bin_dir: str) -> None:
    from node_agent.install_cni import confdir
    from node_agent.install_cni.runtime import under_root
    from node_agent.install_cni.service import plugin_problem

    if not confdir.entry_present(under_root(host_root, cni_conf_dir), host_root=host_root):
        click.echo(f"not ready: no headrace-cni entry at the end of the primary CNI config in {cni_conf_dir}",
                   err=True)
        sys.exit(1)
    if problem := plugin_problem(cni_bin_dir, host_root):  # restarting the pod installs the plugin again
        click.echo(f"not ready: {problem}", err=True)
        sys.exit(1)
    click.echo("ready: headrace-cni chained and installed")


@click.command("uninstall-cni")
@_path_options
def uninstall_cni(host_root: str, install_dir: str, cni_bin_dir: str, cni_conf_dir: str) -> None:
    """Remove exactly what install-cni added (entry, converted .conf, launcher, runtime)."""
    from node_agent.install_cni import service

    opts = service.InstallOptions(
        cni_conf_dir=cni_conf_dir, cni_bin_dir=cni_bin_dir, install_dir=install_dir, host_root=host_root
    )
    click.echo(json.dumps(service.uninstall(opts)))
