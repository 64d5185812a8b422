"""Connecting to the agent's unix socket, every failure turned into one exception type with a clear
message (the plugin's clients each have their own "agent unreachable" error). No imports: it sits on the
plugin's hot path."""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any


def describe(exc: OSError, path: str, hint: str = "") -> str:
    """What a failed connect to the agent at `path` means, in words."""
    if isinstance(exc, FileNotFoundError):
        return f"agent socket {path} does not exist{hint}"
    if isinstance(exc, ConnectionRefusedError):
        return f"agent socket {path} refused the connection"
    if isinstance(exc, TimeoutError):
        return f"connecting to the agent at {path} timed out"
    return f"cannot connect to the agent at {path}: {exc.strerror or exc}"


def connect(sock: Any, path: str, error: type[Exception], hint: str = "") -> None:
    """sock.connect(path); FileNotFoundError, refusal, timeout and other OSErrors raised as `error`."""
    try:
        sock.connect(path)
    except OSError as exc:
        raise error(describe(exc, path, hint)) from exc
