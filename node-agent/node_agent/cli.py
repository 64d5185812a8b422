"""The `headrace` command: wires the subcommands, each defined in node_agent.commands.<module>.

Subcommands are imported only when invoked, so `headrace --help` and small commands stay fast.
"""

from __future__ import annotations

import importlib
import sys

import click

# name -> (module under node_agent.commands, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "agent": ("agent", "agent", "Run the node agent."),
    "proxy": ("proxy", "proxy", "Run the reference node proxy."),
    "status": ("status", "status", "Show the pods the local agent manages."),
    "install-cni": ("install_cni", "install_cni", "Install the plugin and chain it into the CNI config."),
    "uninstall-cni": ("install_cni", "uninstall_cni", "Remove what install-cni added."),
    "lab": ("lab", "lab", "Run or manage the local kernel lab."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module, attr, _ = entry
        try:
            mod = importlib.import_module(f"node_agent.commands.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"node_agent.commands.{module}":
                raise
            return None
        command = getattr(mod, attr)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(package_name="headrace")
def main() -> None:
    """headrace: traffic redirection for service meshes (node agent and tools)."""


if __name__ == "__main__":
    sys.exit(main())
