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
(the agent's table: `backends/iptables/in_process_commands.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from cni.kernel import spawn
from cni.kernel.iptables_run import split_netns_argv
from node_agent.kernel.netns_runner import run_in_netns

Jobs = Sequence[tuple[Sequence[str], str | None]]
Builtin = Mapping[tuple[str, ...], Callable[[], None]]


def _builtin(fn: Callable[[], None]) -> spawn.Result:
    try:
        fn()
    except OSError as exc:
        return spawn.Result(2, "", f"RTNETLINK answers: {exc.strerror or exc}\n")
    return spawn.Result(0, "", "")


def _run_here(jobs: list[tuple[list[str], str | None]], table: Builtin, timeout: float) -> list[spawn.Result]:
    """The batch in the calling thread's netns: built-in commands first (microseconds), then the rest."""
    builtin = [table.get(tuple(argv)) if stdin is None else None for argv, stdin in jobs]
    done = {i: _builtin(fn) for i, fn in enumerate(builtin) if fn is not None}
    started = iter(spawn.spawn_many([job for job, fn in zip(jobs, builtin, strict=True) if fn is None], timeout))
    return [done[i] if i in done else next(started) for i in range(len(jobs))]


class InNetnsSpawner:
    """A `cni.kernel.spawn.Runner` that enters the netns itself instead of starting nsenter."""

    __slots__ = ("builtin",)

    def __init__(self, builtin: Builtin | None = None) -> None:
        self.builtin: Builtin = builtin or {}

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
            return _run_here(bare, self.builtin, timeout)

        try:
            return run_in_netns(netns, inside)
        except OSError as exc:
            if entered:
                raise  # from starting a command (or the thread's way back): as spawn_many raises
            message = f"nsenter: cannot enter {netns}: {exc.strerror or exc}\n"
            return [spawn.Result(1, "", message) for _ in jobs]
