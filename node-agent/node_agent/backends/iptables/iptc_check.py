"""Cheap "unchanged" answers for the iptables drift check; iptables-save stays the authority.

The agent checks every enrolled pod's rules every `--drift-interval`. On legacy hosts the
`DriftShortcut` first reads the pod's tables in-process (`iptc_reader`, python-iptables, no process) and
compares a fingerprint of our chains and jumps (`iptc_fingerprint`) with the one recorded for that netns.
Equal: the rules are exactly as they were when last verified, so the answer is "intact" and nothing is
spawned. Anything else (no record yet, a different spec or family set, a different fingerprint, the
in-process read failing or python-iptables unavailable) runs the given authoritative check (the
iptables-save compare), whose problems are returned as they are and drive the repair.

A fingerprint is recorded only from a state the authoritative check has just found intact, and only if
the in-process reads right before and right after that check agree (a change racing with the check
cannot be recorded as good) and no apply/remove touched the netns meanwhile (`forget` bumps a
generation). Apply and remove forget the netns' record, so the first check after them is the full
compare, except after an apply that proved it wrote exactly the spec's rules into a netns nobody else
changed meanwhile (`record_written`: on nft hosts, every commit between two generation reads was one of
the agent's fresh in-process batches); that state is recorded as if verified.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple, Protocol

from node_agent.backends.iptables.iptc_reader import IptcReadError, IptcUnavailable

MAX_RECORDS = 65536  # netns paths remembered; beyond that everything is forgotten (then re-learnt)


class CheckStats:
    """Counts of drift checks by how they were decided. Thread-safe."""

    PATHS = ("in_process", "iptables_save")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.PATHS, 0)
        self._read_errors = 0

    def count(self, path: str) -> None:
        if path not in self._counts:
            raise ValueError(f"unknown check path {path!r}")
        with self._lock:
            self._counts[path] += 1

    def read_error(self) -> None:
        with self._lock:
            self._read_errors += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {**self._counts, "read_errors": self._read_errors}


# Process-wide: the agent's /metrics exports these (node_agent.serve.metrics); one agent per process.
STATS = CheckStats()


class FingerprintReader(Protocol):
    def ready(self) -> bool: ...

    def start_loading(self) -> None: ...

    def fingerprint(self, netns_path: str, families: Sequence[int], prefix: str) -> bytes: ...


class QuickReader(Protocol):
    def digest(self, netns_path: str, families: Sequence[int]) -> bytes: ...


class _Record(NamedTuple):
    spec: Hashable
    families: tuple[int, ...]
    prefix: str
    digest: bytes
    quick: bytes | None = None  # the whole-state digest read before that verification (or None)
    written: bool = False  # recorded right after our own fresh write (record_written): nothing else there


class DriftShortcut:
    def __init__(self, reader: FingerprintReader, stats: CheckStats | None = None,
                 quick: QuickReader | None = None) -> None:
        """quick: a cheaper digest of the netns' whole state, asked first (legacy: `xt_digest`): equal to
        the one read before the last verification, nothing at all changed since."""
        self.reader = reader
        self.quick = quick
        self.stats = stats if stats is not None else STATS
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}
        self._generation = 0

    def _read_quick(self, netns_path: str, families: tuple[int, ...]) -> bytes | None:
        if self.quick is None:
            return None
        try:
            return self.quick.digest(netns_path, families)
        except (OSError, ValueError):
            self.stats.read_error()
            return None

    def _read(self, netns_path: str, families: tuple[int, ...], prefix: str) -> bytes | None:
        if not self.reader.ready():
            self.reader.start_loading()
            return None
        try:
            return self.reader.fingerprint(netns_path, families, prefix)
        except (IptcReadError, IptcUnavailable, OSError, ValueError):
            self.stats.read_error()
            return None

    def check(
        self,
        netns_path: str,
        spec: Hashable,
        families: Sequence[int],
        prefix: str,
        authoritative: Callable[[], list[str]],
    ) -> list[str]:
        """Problems of the pod's rules ([] = intact), from the fingerprint when it matches the recorded
        one, else from `authoritative()` (whose exceptions propagate)."""
        fams = tuple(families)
        with self._lock:
            record = self._records.get(netns_path)
            generation = self._generation
        if record is not None and record[:3] != (spec, fams, prefix):
            record = None  # recorded for another spec, family set or prefix: no answer from it
        quick = self._read_quick(netns_path, fams) if record is not None else None
        if record is not None and quick is not None and record.quick == quick:
            self.stats.count("in_process")  # nothing in the netns changed since it was verified
            return []
        before = self._read(netns_path, fams, prefix)
        if record is not None and before is not None and record.digest == before:
            self.stats.count("in_process")
            if quick is not None:  # read before `before`: a change since then shows next time
                self._store(netns_path, generation, record._replace(quick=quick), replacing=record)
            return []
        self.stats.count("iptables_save")
        problems = authoritative()
        if problems:
            self.forget(netns_path)
            return problems
        if before is None:
            return problems
        after = self._read(netns_path, fams, prefix)
        if after != before:
            return problems
        self._store(netns_path, generation, _Record(spec, fams, prefix, after, quick))
        return problems

    def _store(self, netns_path: str, generation: int, record: _Record, replacing: _Record | None = None) -> None:
        """Record a verified state unless an apply/remove (forget) or another check came in between."""
        with self._lock:
            if self._generation != generation:
                return
            if replacing is not None and self._records.get(netns_path) is not replacing:
                return
            self._put(netns_path, record)

    def _put(self, netns_path: str, record: _Record) -> None:
        """(lock held)"""
        if len(self._records) >= MAX_RECORDS and netns_path not in self._records:
            self._records.clear()
        self._records[netns_path] = record

    def record_written(self, netns_path: str, spec: Hashable, families: Sequence[int], prefix: str,
                       digest: bytes) -> None:
        """Record a state the caller has just written and proved to be exactly the spec's rules (the
        caller's own proof stands in for the authoritative check); the next check compares with it."""
        with self._lock:
            self._put(netns_path, _Record(spec, tuple(families), prefix, digest, written=True))

    def written(self, netns_path: str) -> bytes | None:
        """The digest of a netns whose record is a fresh write of ours that no check has found changed
        since (the state of that write); None otherwise."""
        with self._lock:
            record = self._records.get(netns_path)
        return record.digest if record is not None and record.written else None

    def moved(self, old_path: str, new_path: str) -> None:
        """The netns recorded at `old_path` is checked at `new_path` from now on (the same netns: a pin of
        it); its record, if any, follows."""
        with self._lock:
            record = self._records.pop(old_path, None)
            if record is not None:
                self._put(new_path, record)

    def forget(self, netns_path: str) -> None:
        """Drop the record of a netns (its rules are being changed by us, or it is gone)."""
        with self._lock:
            self._records.pop(netns_path, None)
            self._generation += 1

    def recorded(self, netns_path: str) -> bool:
        with self._lock:
            return netns_path in self._records
