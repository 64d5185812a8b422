"""libnftables in-process, inside a pod's network namespace (Debian's python3-nftables, module `nftables`).

A libnftables context opens its netlink socket when it is created, in the netns of the creating thread,
and keeps it: so a context is made *inside* the netns (the thread enters it with `cni.kernel.netns.entered`
and always comes back), used for the few commands of one operation, and freed. Making one costs well
under a millisecond; no process is started.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from cni.kernel.netns import NetnsReturnError, entered
from node_agent.backends.base import BackendError

_ABSENT = "No such file or directory"


class NftResult(NamedTuple):
    rc: int
    output: str
    error: str


def load() -> object:
    """The `nftables` module (BackendError naming the package when it is missing)."""
    try:
        import nftables  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError as exc:
        raise BackendError(f"the nftables backend needs libnftables' Python binding (python3-nftables): {exc}") from exc
    return nftables


def run_in_netns(netns_path: str | None, commands: Sequence[str], json: bool = False) -> list[NftResult]:
    """Run nft commands (each a full nft input text: one command or a whole transaction) one after the
    other in the netns at `netns_path` (None: the calling thread's own), with one fresh context; their
    results in order (`json`: listings as `nft -j` prints them)."""
    module = load()
    if netns_path is None:
        ctx = module.Nftables()  # type: ignore[attr-defined]
        ctx.set_json_output(json)
        try:
            return [NftResult(*ctx.cmd(c)) for c in commands]
        finally:
            del ctx
    try:
        with entered(netns_path):
            ctx = module.Nftables()  # type: ignore[attr-defined]
            ctx.set_json_output(json)
            try:
                return [NftResult(*ctx.cmd(c)) for c in commands]
            finally:
                del ctx
    except NetnsReturnError:
        raise
    except OSError as exc:
        raise BackendError(f"cannot enter network namespace {netns_path}: {exc}") from exc


def listing_of(result: NftResult) -> str | None:
    """A `list table` result: the text, None when the table does not exist; BackendError otherwise."""
    if result.rc == 0:
        return result.output
    if _ABSENT in result.error:
        return None
    raise BackendError(f"nft list failed: {result.error.strip()}")
