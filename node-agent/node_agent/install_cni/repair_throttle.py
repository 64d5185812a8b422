"""How often install-cni's watch may rewrite the primary CNI config (pure: the caller gives the clock).

Another writer that keeps dropping our entry (a primary CNI agent that owns its config exclusively, or a
second installer of another chained plugin) would otherwise fight us as fast as both can write: every
rewrite wakes the other. Here a write is followed by at least `min_interval` before the next one, and
once `warn_after` writes fall within `window` the caller is told, at most once a window, to say so.
"""

from __future__ import annotations

from collections import deque


class RepairThrottle:
    def __init__(self, min_interval: float = 0.5, window: float = 10.0, warn_after: int = 5) -> None:
        self.min_interval = min_interval
        self.window = window
        self.warn_after = warn_after
        self._writes: deque[float] = deque()
        self._warned_at: float | None = None

    def wrote(self, now: float) -> None:
        """The watch rewrote the config at `now`."""
        self._writes.append(now)
        while self._writes and self._writes[0] <= now - self.window:
            self._writes.popleft()

    def delay(self, now: float) -> float:
        """Seconds to wait before the next look at the config (0: look when the directory changes)."""
        if not self._writes:
            return 0.0
        return max(0.0, self._writes[-1] + self.min_interval - now)

    def fighting(self, now: float) -> int:
        """The writes within the window when they are enough to warn about (once a window), else 0."""
        recent = sum(1 for t in self._writes if t > now - self.window)
        if recent < self.warn_after or (self._warned_at is not None and now - self._warned_at < self.window):
            return 0
        self._warned_at = now
        return recent
