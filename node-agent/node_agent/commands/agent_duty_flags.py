"""The `headrace agent` flags of the node duties (install-cni in the agent, boot-race repair); see
node_agent.agent.duties. Kept apart from commands/agent.py so the command only gains one decorator."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from node_agent.agent.duties import DutyOptions

DUTY_FLAGS = ("install_cni", "cni_conf_dir", "cni_bin_dir", "cni_install_dir", "cni_cleanup_on_exit",
              "repair_sidecars")


def duty_flags(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--install-cni", is_flag=True,
                     help="Also run install-cni in the agent: install the plugin, chain it into the primary "
                          "CNI config, keep it there while the agent runs."),
        click.option("--cni-conf-dir", default="/etc/cni/net.d", show_default=True,
                     help="With --install-cni: the node's CNI config dir."),
        click.option("--cni-bin-dir", default="/opt/cni/bin", show_default=True,
                     help="With --install-cni: the node's CNI plugin dir (the headrace-cni launcher)."),
        click.option("--cni-install-dir", default="/opt/headrace", show_default=True,
                     help="With --install-cni: the plugin's runtime and install state."),
        click.option("--cni-cleanup-on-exit", is_flag=True,
                     help="With --install-cni: on SIGTERM/SIGINT remove exactly what the agent added."),
        click.option("--repair-sidecars", type=click.Choice(["apply", "flag", "off"]), default="apply",
                     show_default=True,
                     help="Sidecar pods that started before headrace-cni was installed (no rules in their "
                          "netns): apply = install the sidecar rules in place, flag = only report, off."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def build_duties(values: dict[str, Any]) -> DutyOptions:
    """DutyOptions from the flag values; a bad value is a usage error naming the flag."""
    from node_agent.agent.duties import DutyConfigError, build_duty_options

    try:
        return build_duty_options(**{k: values[k] for k in DUTY_FLAGS})
    except DutyConfigError as exc:
        raise click.UsageError(str(exc)) from exc
