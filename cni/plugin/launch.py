"""The plugin executable's entry point (`run_executable`), what the launcher install-cni lays calls.

An ADD goes first to the agent's socket as it came (`cni.plugin.relay_client`, `cni.contract.relay`):
when the agent runs it, its answer is printed and nothing else of the plugin is imported. Every other
command, and an ADD the agent declines or cannot take, runs the plugin's own code (`cni.plugin.entry`),
which then knows how the relay went (it does not ask the same agent twice; a pod the agent held and then
left unanswered fails closed).

Imports only `posix` and `sys` here (not even `os`): start-up is most of an ADD's cost.
"""

from __future__ import annotations

import posix
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from cni.plugin.relay_client import Answer

#: The agent socket of a default configuration (`agent_socket` in the network configuration).
DEFAULT_AGENT_SOCKET = "/var/run/headrace/cni.sock"


def read_stdin() -> bytes:
    chunks = []
    while True:
        try:
            chunk = posix.read(0, 1 << 16)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[posix.write(fd, data):]
        except OSError:
            return


def run_executable(agent_socket: str = DEFAULT_AGENT_SOCKET) -> None:
    """Run one invocation and leave with posix._exit, skipping the interpreter's finalization (tearing
    down modules a short-lived process no longer needs costs 2-3 ms of every ADD). Nothing is lost:
    stdout is written unbuffered here or flushed by `entry.main`, the log is written unbuffered, every
    child process was waited for, and the plugin starts no threads."""
    stdin = read_stdin()
    relayed: Answer | None = None
    if posix.environ.get(b"CNI_COMMAND") == b"ADD":
        from cni.plugin import relay_client

        relayed = relay_client.add(agent_socket, relay_client.env_of(posix.environ), stdin)
        if relayed is not None and relayed.kind == "done":
            _write_all(1, relayed.output)
            posix._exit(relayed.status)
    from cni.plugin.entry import main

    status = 1
    try:
        status = main(stdin, agent_socket, relayed)
    finally:
        try:
            sys.stderr.flush()
        finally:
            posix._exit(status)
