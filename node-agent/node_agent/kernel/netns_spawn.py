"""Start the kernel layer's commands (iptables-restore/-save, ip, nft) inside a pod netns without nsenter.

The CNI plugin runs each of them as `nsenter --net=PATH -- argv` (`cni.kernel.iptables_run.netns_argv`):
one more exec per command, about 1 ms each here. The agent installs `InNetnsSpawner` as the kernel
layer's runner (`cni.kernel.spawn.install_runner`): a batch whose commands all carry the nsenter wrapper
for one netns is started from a pooled thread that entered that netns (`netns_runner`), so the children
are born in it (posix_spawn clones the calling thread, namespaces included). Anything else — commands
without the wrapper, a batch for several netns — is started as it is.

The contract stays the plugin's: a netns that cannot be entered gives each command exit status 1 and a
message on stderr (what nsenter would have said), a command that cannot be started raises OSError.
"""

from __future__ import annotations

from collections.abc import Sequence

from cni.kernel import spawn
from cni.kernel.iptables_run import split_netns_argv
from node_agent.kernel.netns_runner import run_in_netns

Jobs = Sequence[tuple[Sequence[str], str | None]]


class InNetnsSpawner:
    """A `cni.kernel.spawn.Runner` that enters the netns itself instead of starting nsenter."""

    __slots__ = ()

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
            return spawn.spawn_many(bare, timeout)

        try:
            return run_in_netns(netns, inside)
        except OSError as exc:
            if entered:
                raise  # from starting a command (or the thread's way back): as spawn_many raises
            message = f"nsenter: cannot enter {netns}: {exc.strerror or exc}\n"
            return [spawn.Result(1, "", message) for _ in jobs]
