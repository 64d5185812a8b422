"""`headrace proxy`: the reference node proxy (ztunnel role) for tests and the lab."""

from __future__ import annotations

import os
import sys

import click


@click.command("proxy")
@click.option("--socket", "socket_path", default=None, type=click.Path(dir_okay=False),
              help="The agent's socket [grpc: /var/run/headrace/proxy.sock; zds: /var/run/ztunnel/ztunnel.sock].")
@click.option("--protocol", type=click.Choice(["grpc", "zds"]), default="grpc", show_default=True,
              help="grpc: headrace's node-proxy protocol; zds: ztunnel's (netns fds over SOCK_SEQPACKET).")
@click.option("--id", "proxy_id", default=None, help="Proxy identity sent in Hello [refproxy-<host>-<pid>].")
@click.option("--netns-fd/--netns-path", default=False, show_default=True,
              help="Get each pod netns as an fd over the agent's SCM_RIGHTS side channel instead of "
                   "opening the pinned path.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--cgroup", "cgroup", default=None, type=click.Path(file_okay=False),
              help="Join this cgroup v2 directory at start (ambient eBPF: the agent's --proxy-cgroup, where "
                   "SO_ORIGINAL_DST is answered for the proxy's sockets).")
@click.option("--orig-src/--own-src", "orig_src", default=False, show_default=True,
              help="Dial the app from the client's own address (IP_TRANSPARENT), as ztunnel with "
                   "ENABLE_ORIG_SRC; needs the pod's ambient policy routing (fwmark 0x111 lookup 100).")
def proxy(socket_path: str | None, protocol: str, proxy_id: str | None, netns_fd: bool, log_level: str,
          cgroup: str | None, orig_src: bool) -> None:
    """Run the reference node proxy: one JSON line per finished connection on stdout, logs on stderr."""
    from node_agent.refproxy.main import run

    if cgroup is not None:
        from pathlib import Path

        procs = Path(cgroup) / "cgroup.procs"
        try:
            procs.write_text(str(os.getpid()))
        except OSError as exc:
            raise click.ClickException(f"--cgroup {cgroup}: cannot join ({exc.strerror or exc})") from exc

    if socket_path is None:
        socket_path = "/var/run/ztunnel/ztunnel.sock" if protocol == "zds" else "/var/run/headrace/proxy.sock"
    sys.exit(run(socket_path, proxy_id, netns_fd, log_level, protocol, orig_src=orig_src))
