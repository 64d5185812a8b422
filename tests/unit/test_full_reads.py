"""The period between a skipped pod's full reads: at most FULL_EVERY, fixed per pod, spread over pods."""

from __future__ import annotations

import uuid

from node_agent.backends.full_reads import FULL_EVERY, SPREAD, full_read_period


def test_a_pods_period_is_fixed_and_never_longer_than_full_every() -> None:
    uids = [str(uuid.UUID(int=i * 7919 + 1)) for i in range(2000)]
    periods = [full_read_period(u) for u in uids]
    assert all(FULL_EVERY * (1 - SPREAD) < p <= FULL_EVERY for p in periods)
    assert periods == [full_read_period(u) for u in uids]  # the same pod, the same period


def test_a_wave_read_at_once_comes_due_spread_over_a_quarter_minute() -> None:
    """1000 pods first read in the same pass: no one-second drift pass gets more than a few percent of them
    for their next full read (without the spread, all of them)."""
    uids = [str(uuid.uuid4()) for _ in range(1000)]
    seconds: dict[int, int] = {}
    for u in uids:
        second = int(full_read_period(u))
        seconds[second] = seconds.get(second, 0) + 1
    assert len(seconds) >= int(FULL_EVERY * SPREAD)
    assert max(seconds.values()) <= 150
