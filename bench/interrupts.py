"""A bench stopped with SIGTERM (`kill`, a timeout) or Ctrl-C ends the same way: KeyboardInterrupt, so its
clean-up runs (the netns, cgroups, mounts and agents it made are removed); a second signal does not cut that
clean-up short."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_like_ctrl_c() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt (SIGINT too when the bench was started with it ignored,
    as a background job is)."""
    for sig in _SIGNALS:
        signal.signal(sig, _interrupt)


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Both signals ignored for the block (a clean-up), then put back."""
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
