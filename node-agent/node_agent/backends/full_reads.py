"""How often a pod whose polls are skipped (a change count or the eBPF shortcut stands for its read) is read in
full anyway: at least every `FULL_EVERY` seconds, and sooner by an amount fixed per pod (up to a quarter of
it), so that the pods of one enrolment wave, all first read at about the same moment, do not all come due
for their full read in the same drift pass, minute after minute."""

from __future__ import annotations

import zlib

FULL_EVERY = 60.0  # seconds: the longest a skipped pod goes without a full read
SPREAD = 0.25  # of FULL_EVERY: how much sooner a pod's full read may come, fixed per pod


def full_read_period(uid: str) -> float:
    """The pod's period between full reads: in (FULL_EVERY * (1 - SPREAD), FULL_EVERY], the same every time
    for one uid, spread evenly over uids."""
    return FULL_EVERY * (1.0 - SPREAD * (zlib.crc32(uid.encode()) / 2**32))
