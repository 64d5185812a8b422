"""The `headrace` command (placeholder)."""

import click


@click.group()
def main() -> None:
    """headrace node agent and tools."""
