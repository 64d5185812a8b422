"""`headrace status [--json] [--cni-socket PATH]`."""

from __future__ import annotations

import json

import click

DEFAULT_SOCKET = "/var/run/headrace/cni.sock"


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--cni-socket", default=DEFAULT_SOCKET, show_default=True,
              help="The agent's plugin-event socket (as given to `headrace agent`).")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(0.1, 120))
def status(as_json: bool, cni_socket: str, timeout: float) -> None:
    """Show the pods the local agent manages."""
    from node_agent.serve.status_client import StatusError, query, render_table

    try:
        reply = query(cni_socket, timeout)
    except StatusError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        out = {"pods": reply["pods"]}
        for key in ("backend", "proxy", "node", "proxy_cgroup"):
            if key in reply:
                out[key] = reply[key]
        click.echo(json.dumps(out, indent=2, sort_keys=True))
    else:
        click.echo(render_table(reply))
