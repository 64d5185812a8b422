"""`netns_lock`: one writer of our rules at a time per network namespace (flock on the netns file)."""

from __future__ import annotations

import fcntl
import os
import time

from cni.kernel.iptables_run import IptablesError
from cni.kernel.netns import THREAD_NETNS

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from types import TracebackType

_LOCK_TIMEOUT = 60.0


class netns_lock:
    """Serialise our writers (plugin, agent, threads) per netns: flock on the netns file itself, so two
    read-modify-write cycles cannot interleave (both would insert their jumps). None: this thread's."""

    __slots__ = ("fd", "path", "step")

    def __init__(self, netns_path: str | None, step: str) -> None:
        self.path = netns_path if netns_path is not None else THREAD_NETNS
        self.step = step
        self.fd = -1

    def __enter__(self) -> None:
        path, step = self.path, self.step
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise IptablesError(step, f"network namespace {path} does not exist") from None
        except OSError as exc:
            raise IptablesError(step, f"cannot open network namespace {path}", str(exc)) from exc
        try:
            deadline = time.monotonic() + _LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise IptablesError(step, f"timed out waiting for the lock on {path}") from None
                    time.sleep(0.005)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
