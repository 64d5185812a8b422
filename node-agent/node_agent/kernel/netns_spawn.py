"""Start the kernel layer's commands (iptables-restore/-save, ip, nft) inside a pod netns without nsenter.

The CNI plugin runs each of them as `nsenter --net=PATH -- argv` (`cni.kernel.iptables_run.netns_argv`):
one more exec per command, about 1 ms each here. The agent installs `InNetnsSpawner` as the kernel
layer's runner (`cni.kernel.spawn.install_runner`): a batch whose commands all carry the nsenter wrapper
for one netns is started from a pooled thread that entered that netns (`netns_runner`), so the children
are born in it (posix_spawn clones the calling thread, namespaces included). Anything else — commands
without the wrapper, a batch for several netns — is started as it is.

The contract stays the plugin's: a netns that cannot be entered gives each command exit status 1 and a
message on stderr (what nsenter would have said), a command that cannot be started raises OSError.

Commands the caller knows how to do in-process (`builtin`: exact argv → a function run in the netns) are
not started at all: their result is exit status 0, or 2 with the kernel's words as `ip` prints them
(the agent's table: `backends/iptables/in_process_commands.py`). Commands fed on stdin may have a
`restorer` (exact argv → a function of the stdin text, run in the netns) that does the command's work
itself (its result: exit status 0, or the `spawn.Result` it returns, worded as the command would) or
declines with a reason (having changed nothing): then the command is started after all; or raises
`Refused`: the command fails with that message, not started.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from cni.kernel import spawn
from cni.kernel.iptables_run import split_netns_argv
from node_agent.kernel.netns_runner import run_in_netns

Jobs = Sequence[tuple[Sequence[str], str | None]]
Builtin = Mapping[tuple[str, ...], Callable[[], None]]
# None: done (exit 0); a Result: done, with that outcome; a str: why it declined (the command is started)
Restorers = Mapping[tuple[str, ...], Callable[[str], "str | spawn.Result | None"]]

log = logging.getLogger("headrace.netns_spawn")


def _builtin(fn: Callable[[], None]) -> spawn.Result:
    try:
        fn()
    except OSError as exc:
        return spawn.Result(2, "", f"RTNETLINK answers: {exc.strerror or exc}\n")
    return spawn.Result(0, "", "")


class Refused(Exception):
    """A restorer's answer that the command must not be started either: it fails with this message
    (nothing was changed); the caller takes its other way."""


def _restored(fn: Callable[[str], str | spawn.Result | None], argv: list[str], stdin: str) -> spawn.Result | None:
    try:
        declined = fn(stdin)
    except Refused as exc:
        return spawn.Result(1, "", f"{argv[0]}: {exc}\n")
    except Exception:  # a bug of ours must not fail the command: it is started instead
        log.warning("in-process %s failed, starting it", argv[0], exc_info=True)
        return None
    if isinstance(declined, spawn.Result):
        return declined
    if declined is not None:
        log.debug("in-process %s declined, starting it: %s", argv[0], declined)
        return None
    return spawn.Result(0, "", "")


def _run_here(
    jobs: list[tuple[list[str], str | None]], table: Builtin, restorers: Restorers, timeout: float
) -> list[spawn.Result]:
    """The batch in the calling thread's netns: built-in commands and restorers first (microseconds), then
    the rest (and what a restorer declined)."""
    done: dict[int, spawn.Result] = {}
    for i, (argv, stdin) in enumerate(jobs):
        key = tuple(argv)
        if stdin is None and key in table:
            done[i] = _builtin(table[key])
        elif stdin is not None and key in restorers:
            result = _restored(restorers[key], argv, stdin)
            if result is not None:
                done[i] = result
    started = iter(spawn.spawn_many([job for i, job in enumerate(jobs) if i not in done], timeout))
    return [done[i] if i in done else next(started) for i in range(len(jobs))]


class InNetnsSpawner:
    """A `cni.kernel.spawn.Runner` that enters the netns itself instead of starting nsenter."""

    __slots__ = ("builtin", "restorers")

    def __init__(self, builtin: Builtin | None = None, restorers: Restorers | None = None) -> None:
        self.builtin: Builtin = builtin or {}
        self.restorers: Restorers = restorers or {}

    def run_many(self, jobs: Jobs, timeout: float) -> list[spawn.Result]:
        split = [split_netns_argv(argv) for argv, _ in jobs]
        places = {netns for netns, _ in split}
        if len(places) != 1 or None in places:
            return spawn.spawn_many(jobs, timeout)
        (netns,) = places
        assert netns is not None
        bare = [(argv, stdin) for (_, argv), (_, stdin) in zip(split, jobs, strict=True)]
        entered: list[bool] = []

        def inside() -> list[spawn.Result]:
            entered.append(True)
            return _run_here(bare, self.builtin, self.restorers, timeout)

        try:
            return run_in_netns(netns, inside)
        except OSError as exc:
            if entered:
                raise  # from starting a command (or the thread's way back): as spawn_many raises
            message = f"nsenter: cannot enter {netns}: {exc.strerror or exc}\n"
            return [spawn.Result(1, "", message) for _ in jobs]
