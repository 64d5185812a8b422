"""How a list/watch loop paces itself and what it reports (pure: the clock and the random source are injected).

- `Backoff`: the delay before the next attempt after a failure, growing exponentially with jitter, capped;
  `reset` after a healthy watch.
- `WatchTiming`: the bounds of one watch, and the rules over a watch that ended: a watch that ended
  (normally or not) within `short_watch` seconds without delivering an event is a failure (an API server
  or proxy that answers a watch with an empty 200 would otherwise be asked again at once, in a tight loop);
  a watch that delivered an event, or lasted `healthy_after` seconds, resets the backoff.
- `error_reason`: the class of a failed list or watch, the `reason` label of the error count.
- `WatchStats`: one watcher's figures for the metrics (lists, watches, errors by reason, time since the
  last sync).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# the reason classes of a failed list or watch (`error_reason`), each exported even while 0
REASONS = (
    "gone",  # 410: the resourceVersion resumed from is too old; a fresh list follows
    "unauthorized",  # 401
    "forbidden",  # 403: RBAC
    "throttled",  # 429
    "client_error",  # another 4xx
    "server_error",  # 5xx
    "short_watch",  # a watch that ended within `short_watch` seconds without an event
    "stalled",  # a watch that sent nothing for `stall_timeout` seconds
    "bad_response",  # a body that is no list or no watch stream
    "connection",  # connect, TLS, read errors and timeouts of a list
    "other",
)


class WatchError(Exception):
    """A failure the loop recognised itself; `reason` is its class (one of REASONS)."""

    reason = "other"


class GoneError(WatchError):
    """The resourceVersion we resume from is too old: re-list."""

    reason = "gone"


class StalledError(WatchError):
    reason = "stalled"


class ShortWatchError(WatchError):
    reason = "short_watch"


class BadResponseError(WatchError):
    reason = "bad_response"


class ErrorEventError(WatchError):
    """An ERROR watch event other than 410: classed by its code like an HTTP status."""

    def __init__(self, code: object, message: str) -> None:
        super().__init__(message)
        self.reason = status_reason(code if isinstance(code, int) else 0) or "other"


def status_reason(status: int) -> str | None:
    """The reason class of an HTTP status (None: not an error status)."""
    if status == 410:
        return "gone"
    named = {401: "unauthorized", 403: "forbidden", 429: "throttled"}
    if status in named:
        return named[status]
    if 400 <= status < 500:
        return "client_error"
    if 500 <= status < 600:
        return "server_error"
    return None


def error_reason(exc: BaseException) -> str:
    """The reason class of a failed list or watch: ours, by HTTP status (the client's ApiException), a JSON
    body that did not parse, else a network error (OSError, urllib3's errors; status 0: TLS)."""
    if isinstance(exc, WatchError):
        return exc.reason
    status = getattr(exc, "status", None)
    by_status = status_reason(status) if isinstance(status, int) else None
    if by_status is not None:
        return by_status
    if isinstance(exc, ValueError):  # json.JSONDecodeError included
        return "bad_response"
    if isinstance(exc, OSError) or status == 0 or type(exc).__module__.startswith("urllib3"):
        return "connection"
    return "other"


class Backoff:
    """Exponential backoff with "equal jitter": the n-th delay in a row is drawn uniformly from
    [d/2, d], d = min(maximum, initial * factor**n), so many agents failing at once (every node of a
    cluster after an API server restart) spread their retries, and none waits longer than `maximum`.
    `reset` after a success starts over from `initial`."""

    def __init__(self, initial: float = 1.0, maximum: float = 30.0, factor: float = 2.0,
                 rand: Callable[[], float] = random.random) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._rand = rand
        self._next = min(initial, maximum)

    def next_delay(self) -> float:
        ceiling = self._next
        self._next = min(self.maximum, self._next * self.factor)
        return ceiling * (0.5 + 0.5 * self._rand())

    def reset(self) -> None:
        self._next = min(self.initial, self.maximum)


@dataclass(frozen=True)
class WatchTiming:
    """The bounds of one watch, in seconds. `watch_timeout`: asked of the API server (`timeoutSeconds`),
    which then ends the watch normally; `stall_timeout`: the longest silence (no byte) on an open watch
    before it is given up as dead (see `KubernetesSource` for the choice); `list_timeout`: one list;
    `short_watch`, `healthy_after`: see the module text."""

    watch_timeout: int = 300
    stall_timeout: float = 90.0
    list_timeout: float = 30.0
    short_watch: float = 1.0
    healthy_after: float = 30.0

    def is_short(self, duration: float, events: int) -> bool:
        return events == 0 and duration < self.short_watch

    def is_healthy(self, duration: float, events: int) -> bool:
        return events > 0 or duration >= self.healthy_after


@dataclass(frozen=True)
class WatcherFigures:
    lists: int  # full lists done
    watches: int  # watch requests made
    errors: Mapping[str, int]  # failed lists and watches by reason (every one of REASONS)
    sync_age: float  # seconds since the last list done or watch event (bookmarks too) received


class WatchStats:
    """One watcher's figures, updated by its thread and read by the metrics' (thread-safe). Before the
    first sync, the age counts from the creation."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._lists = 0
        self._watches = 0
        self._errors = dict.fromkeys(REASONS, 0)
        self._synced_at = clock()

    def listed(self) -> None:
        with self._lock:
            self._lists += 1
            self._synced_at = self._clock()

    def watch_opened(self) -> None:
        with self._lock:
            self._watches += 1

    def synced(self) -> None:
        with self._lock:
            self._synced_at = self._clock()

    def failed(self, reason: str) -> None:
        with self._lock:
            key = reason if reason in self._errors else "other"
            self._errors[key] += 1

    def figures(self) -> WatcherFigures:
        with self._lock:
            return WatcherFigures(self._lists, self._watches, dict(self._errors),
                                  max(0.0, self._clock() - self._synced_at))
