"""The rules helper child (`rules_helper.RulesHelper`): `python -m node_agent.backends.iptables.rules_helper_main
<flavour>`. Applies each requested pod's rules with its own IptablesBackend, the way the agent would (the
pod netns entered by this one thread, the rules written in-process), and answers with the digest of its
verified fresh write. Keeps nothing between requests. Exits at the end of its input, or when it cannot
return to its own netns."""

from __future__ import annotations

import signal
import sys
from typing import IO

from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.kernel import spawn
from cni.kernel.flavour import Flavour
from cni.kernel.netns import NetnsReturnError
from node_agent.agent import log
from node_agent.backends.base import BackendError, PodTarget
from node_agent.backends.iptables.backend import IptablesBackend
from node_agent.backends.iptables.in_process_commands import IN_PROCESS, RESTORES
from node_agent.backends.iptables.rules_helper import READY, FrameError, read_frame, write_frame
from node_agent.kernel.netns_spawn import InNetnsSpawner

FLAVOURS: tuple[Flavour, ...] = ("legacy", "nft")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in FLAVOURS:
        print(f"usage: rules_helper_main {{{'|'.join(FLAVOURS)}}}", file=sys.stderr)
        return 2
    flavour: Flavour = "nft" if argv[0] == "nft" else "legacy"
    log.setup("warning")  # the agent's JSON lines, on the stderr it shares with the agent
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at the agent's terminal: the agent ends it
    spawn.install_runner(InNetnsSpawner(IN_PROCESS, RESTORES))
    backend = IptablesBackend(flavour=flavour)
    try:
        return serve(backend, sys.stdin.buffer, sys.stdout.buffer.fileno())
    except (BrokenPipeError, FrameError):  # the agent went away or wrote something else: nothing to answer
        return 1


def serve(backend: IptablesBackend, requests: IO[bytes], out: int) -> int:
    write_frame(out, (READY, None, None))
    while True:
        try:
            rid, target, spec = read_frame(requests)
        except EOFError:
            return 0
        if not isinstance(target, PodTarget) or not isinstance(spec, (AmbientSpec, SidecarSpec)):
            write_frame(out, (rid, f"not a pod and a spec: {type(target).__name__}, {type(spec).__name__}", None))
            continue
        try:
            backend.apply_after(target, spec, None)
        except NetnsReturnError as exc:  # this thread may be left in the pod netns: nothing more from here
            write_frame(out, (rid, f"rules helper: {exc}", None))
            return 1
        except BackendError as exc:
            write_frame(out, (rid, str(exc), None))
            continue
        digest = backend.shortcut.written(target.netns_path) if backend.shortcut is not None else None
        backend.forget_applied(target)
        write_frame(out, (rid, None, digest))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
