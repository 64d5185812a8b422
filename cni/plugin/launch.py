"""The plugin executable's entry point (`run_executable`), what the launcher install-cni lays calls.

An ADD, DEL, GC or STATUS goes first to the agent's socket as it came (`cni.plugin.relay_client`,
`cni.contract.relay`): when the agent runs it, its answer is printed and nothing else of the plugin is
imported. Every other command, and one the agent declines or cannot take, runs the plugin's own code
(`cni.plugin.entry`), which then knows how the relay went (it does not ask the same agent twice; a pod
the agent held and then left unanswered fails closed).

On nodes the launcher's `#!` line usually names the compiled front (`cni/front/front.c`), which does the
relay without an interpreter and runs this only when the agent did not run the command: it then passes the
relay's outcome as `--relayed <kind> <why>` (`relayed_by_front`), and this does not relay again.

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


#: The commands relayed (`cni.contract.relay.COMMANDS`, not imported before it is needed).
RELAYED_COMMANDS = (b"ADD", b"DEL", b"GC", b"STATUS")

#: How the compiled front's relay went, when it ran this: `--relayed <kind> <why>` (a runtime passes no
#: arguments to a CNI plugin).
RELAYED_FLAG = "--relayed"
FRONT_OUTCOMES = ("standalone", "unusable", "held")


def relayed_by_front(argv: list[str]) -> tuple[str, str] | None:
    """(kind, why) of the front's relay from the arguments, or None when the front did not relay."""
    if len(argv) == 4 and argv[1] == RELAYED_FLAG and argv[2] in FRONT_OUTCOMES:
        return argv[2], argv[3]
    return None


def run_executable(agent_socket: str = DEFAULT_AGENT_SOCKET) -> None:
    """Run one invocation and leave with posix._exit, skipping the interpreter's finalization (tearing
    down modules a short-lived process no longer needs costs 2-3 ms of every ADD). Nothing is lost:
    stdout is written unbuffered here or flushed by `entry.main`, the log is written unbuffered, every
    child process was waited for, and the plugin starts no threads."""
    stdin = read_stdin()
    relayed: Answer | None = None
    by_front = relayed_by_front(sys.argv)
    if by_front is not None or posix.environ.get(b"CNI_COMMAND") in RELAYED_COMMANDS:
        from cni.plugin import relay_client

        if by_front is not None:  # the front relayed this command, and the agent did not run it
            relayed = relay_client.Answer(*by_front)
        else:
            relayed = relay_client.send(agent_socket, relay_client.env_of(posix.environ), stdin)
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
