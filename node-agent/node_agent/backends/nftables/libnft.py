"""libnftables in-process, inside a pod's network namespace: its C API through ctypes (the library
Debian's python3-nftables binds; the binding's own object would resolve every function per context).

A libnftables context opens its netlink socket when it is created, in the netns of the creating thread,
and keeps it: so a context is made *inside* the netns (the thread enters it with `cni.kernel.netns.entered`
and always comes back), used for the commands of one operation, and freed (in the background when its
transaction deleted a table: that free waits for an RCU grace period). Making one costs ~50 µs (a
python3-nftables `Nftables` object ~140 µs); no process is started. `session` keeps the thread in the
netns with one context for a whole operation (the apply's reads, transaction, policy routing and
read-back), so other in-netns work (rtnetlink, the ruleset generation, the in-process create of
`fresh_write`) runs on the same entry; the context is made at the session's first command (an apply
that creates its table in-process needs none). `run_in_netns` is one session per call.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import lru_cache
from typing import Any, NamedTuple

from cni.kernel.netns import entered
from node_agent.backends.base import BackendError
from node_agent.kernel import background_close

_ABSENT = "No such file or directory"
OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON
SONAME = "libnftables.so.1"


class NftResult(NamedTuple):
    rc: int
    output: str
    error: str


class _Lib:
    """libnftables' C API through ctypes, its functions and prototypes resolved once per process (the
    binding's `Nftables` object resolves all of them again for every context, ~0.1 ms each time)."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(SONAME)
        self.ctx_new = _fn(lib.nft_ctx_new, ctypes.c_void_p, ctypes.c_uint32)
        self.ctx_free = _fn(lib.nft_ctx_free, None, ctypes.c_void_p)
        self.buffer_output = _fn(lib.nft_ctx_buffer_output, ctypes.c_int, ctypes.c_void_p)
        self.buffer_error = _fn(lib.nft_ctx_buffer_error, ctypes.c_int, ctypes.c_void_p)
        self.get_flags = _fn(lib.nft_ctx_output_get_flags, ctypes.c_uint, ctypes.c_void_p)
        self.set_flags = _fn(lib.nft_ctx_output_set_flags, None, ctypes.c_void_p, ctypes.c_uint)
        self.run = _fn(lib.nft_run_cmd_from_buffer, ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)
        self.output = _fn(lib.nft_ctx_get_output_buffer, ctypes.c_char_p, ctypes.c_void_p)
        self.error = _fn(lib.nft_ctx_get_error_buffer, ctypes.c_char_p, ctypes.c_void_p)


def _fn(f: Any, restype: Any, *argtypes: Any) -> Any:
    f.restype, f.argtypes = restype, list(argtypes)
    return f


@lru_cache(maxsize=1)
def load() -> _Lib:
    """libnftables (BackendError naming the package when it is missing)."""
    try:
        return _Lib()
    except (OSError, AttributeError) as exc:
        raise BackendError(f"the nftables backend needs libnftables ({SONAME}: Debian's libnftables1, "
                           f"which python3-nftables installs): {exc}") from exc


class Session:
    """One libnftables context made in the netns the calling thread is in (inside `session`), when the
    first command needs it."""

    def __init__(self, lib: _Lib) -> None:
        self._lib = lib
        self._ctx: int | None = None  # made at the first command: a session may need none
        self._json = False
        # set after a transaction that deleted a table: the context is freed in the background (the free
        # waits for an RCU grace period then; `node_agent.kernel.background_close`)
        self.close_in_background = False

    def _context(self) -> int:
        if self._ctx is None:
            ctx = self._lib.ctx_new(0)
            if not ctx:
                raise BackendError("libnftables could not make a context")
            self._lib.buffer_output(ctx)
            self._lib.buffer_error(ctx)
            self._ctx = ctx
        return self._ctx

    def cmd(self, text: str, json: bool = False) -> NftResult:
        """One nft input text (a command or a whole transaction); `json`: listings as `nft -j` prints them."""
        lib, ctx = self._lib, self._context()
        if json != self._json:
            flags = lib.get_flags(ctx)
            lib.set_flags(ctx, flags | OUTPUT_JSON if json else flags & ~OUTPUT_JSON)
            self._json = json
        rc = lib.run(ctx, text.encode())
        output, error = lib.output(ctx) or b"", lib.error(ctx) or b""
        return NftResult(int(rc), output.decode(errors="replace"), error.decode(errors="replace"))

    def close(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx and self.close_in_background:
            lib = self._lib
            background_close.later(lambda: lib.ctx_free(ctx))
        elif ctx:
            self._lib.ctx_free(ctx)


@contextmanager
def session(netns_path: str | None) -> Iterator[Session]:
    """The calling thread inside the netns at `netns_path` (None: stays where it is) with one context, for
    the block; BackendError when the netns cannot be entered. Any other in-netns work in the block (sockets
    made there) lands in that netns too."""
    lib = load()
    place: AbstractContextManager[None] = nullcontext() if netns_path is None else entered(netns_path)
    try:
        place.__enter__()
    except OSError as exc:
        raise BackendError(f"cannot enter network namespace {netns_path}: {exc}") from exc
    try:
        s = Session(lib)
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
