"""The `headrace` command: wires the subcommands, each defined in node_agent.commands.<module>.

Each subcommand is imported by its own small loader only when invoked, so `headrace --help` and small
commands stay fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import click


def _agent() -> click.Command:
    from node_agent.commands.agent import agent

    return agent


def _proxy() -> click.Command:
    from node_agent.commands.proxy import proxy

    return proxy


def _status() -> click.Command:
    from node_agent.commands.status import status

    return status


def _install_cni() -> click.Command:
    from node_agent.commands.install_cni import install_cni

    return install_cni


def _uninstall_cni() -> click.Command:
    from node_agent.commands.install_cni import uninstall_cni

    return uninstall_cni


def _lab() -> click.Command:
    from node_agent.commands.lab import lab

    return lab


# name -> (loader, one-line help)
COMMANDS: dict[str, tuple[Callable[[], click.Command], str]] = {
    "agent": (_agent, "Run the node agent."),
    "proxy": (_proxy, "Run the reference node proxy."),
    "status": (_status, "Show the pods the local agent manages."),
    "install-cni": (_install_cni, "Install the plugin and chain it into the CNI config."),
    "uninstall-cni": (_uninstall_cni, "Remove what install-cni added."),
    "lab": (_lab, "Run or manage the local kernel lab."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        return entry[0]() if entry is not None else None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(package_name="headrace")
def main() -> None:
    """headrace: traffic redirection for service meshes (node agent and tools)."""


if __name__ == "__main__":
    sys.exit(main())
