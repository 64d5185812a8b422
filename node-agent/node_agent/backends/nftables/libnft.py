"""libnftables in-process, inside a pod's network namespace (Debian's python3-nftables, module `nftables`).

A libnftables context opens its netlink socket when it is created, in the netns of the creating thread,
and keeps it: so a context is made *inside* the netns (the thread enters it with `cni.kernel.netns.entered`
and always comes back), used for the commands of one operation, and freed. Making one costs well
under a millisecond; no process is started. `session` keeps the thread in the netns with one context for
a whole operation (the apply's reads, transaction, policy routing and read-back), so other in-netns work
(rtnetlink, the ruleset generation) runs on the same entry; `run_in_netns` is one session per call.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import NamedTuple

from cni.kernel.netns import entered
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


class Session:
    """One libnftables context made in the netns the calling thread is in (inside `session`)."""

    def __init__(self, module: object) -> None:
        self._ctx = module.Nftables()  # type: ignore[attr-defined]
        self._json = False
        self._ctx.set_json_output(False)

    def cmd(self, text: str, json: bool = False) -> NftResult:
        """One nft input text (a command or a whole transaction); `json`: listings as `nft -j` prints them."""
        if json != self._json:
            self._ctx.set_json_output(json)
            self._json = json
        return NftResult(*self._ctx.cmd(text))

    def close(self) -> None:
        del self._ctx


@contextmanager
def session(netns_path: str | None) -> Iterator[Session]:
    """The calling thread inside the netns at `netns_path` (None: stays where it is) with one context, for
    the block; BackendError when the netns cannot be entered. Any other in-netns work in the block (sockets
    made there) lands in that netns too."""
    module = load()
    place: AbstractContextManager[None] = nullcontext() if netns_path is None else entered(netns_path)
    try:
        place.__enter__()
    except OSError as exc:
        raise BackendError(f"cannot enter network namespace {netns_path}: {exc}") from exc
    try:
        s = Session(module)
        try:
            yield s
        finally:
            s.close()
    finally:
        place.__exit__(None, None, None)  # NetnsReturnError when the thread cannot go back


def run_in_netns(netns_path: str | None, commands: Sequence[str], json: bool = False) -> list[NftResult]:
    """Run nft commands (each a full nft input text: one command or a whole transaction) one after the
    other in the netns at `netns_path` (None: the calling thread's own), with one fresh context; their
    results in order (`json`: listings as `nft -j` prints them)."""
    with session(netns_path) as s:
        return [s.cmd(c, json) for c in commands]


def listing_of(result: NftResult) -> str | None:
    """A `list table` result: the text, None when the table does not exist; BackendError otherwise."""
    if result.rc == 0:
        return result.output
    if _ABSENT in result.error:
        return None
    raise BackendError(f"nft list failed: {result.error.strip()}")
