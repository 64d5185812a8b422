"""Put a fresh restore text into a new pod netns' iptables-nft table in-process: no iptables-nft-restore.

The nft counterpart of `xt_fresh_write`: the text is read (`xt_fresh_rules.read_fresh`), the batch
iptables-nft would send is built (`nft_compat_batch`) and sent on a netfilter netlink socket made by
the calling thread (which is inside the pod netns); the kernel applies the batch as one transaction.
Its tables come with NLM_F_EXCL: where one exists already (anything at all of iptables-nft's in that
table and family), the batch fails with EEXIST and changes nothing, and the text goes to iptables-nft-restore
as before. So does anything the reader or the batch builder does not lay out. The kernel's answer to
every message is read; any error means the transaction was aborted.

Each batch committed here is counted per netns (`COMMITS`): with the netns' ruleset generation read
before and after an apply, the backend can tell that every commit in between was one of these fresh
writes (see `IptablesBackend.recorded_if_fresh`), so the rules are exactly the text's and need no read-back.
"""

from __future__ import annotations

import os
import threading
from functools import lru_cache
from typing import NamedTuple

from cni.kernel.nft_commit import declined_here
from cni.rules.nft_compat_batch import batch
from cni.rules.xt_fresh_rules import FreshTable, Unsupported, read_fresh
from node_agent.backends.iptables.nft_generation import NftGenerationError, read_generation

MAX_NETNS = 65536  # netns counted; beyond that the counts start again (a caller then sees a mismatch)


class FreshCommits:
    """How many fresh batches this process committed in each netns (by its nsfs device and inode)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[int, int], int] = {}

    @staticmethod
    def key_of(netns_path: str) -> tuple[int, int]:
        st = os.stat(netns_path)
        return st.st_dev, st.st_ino

    def note_here(self) -> None:
        """One more commit in the calling thread's netns (uncounted if that cannot be told: a caller then
        sees more commits than counted, which only costs it the read-back)."""
        try:
            key = self.key_of("/proc/thread-self/ns/net")
        except OSError:
            return
        with self._lock:
            if len(self._counts) >= MAX_NETNS and key not in self._counts:
                self._counts.clear()
            self._counts[key] = self._counts.get(key, 0) + 1

    def count(self, key: tuple[int, int]) -> int:
        with self._lock:
            return self._counts.get(key, 0)


COMMITS = FreshCommits()


class Mark(NamedTuple):
    """A netns' ruleset generation and this process' fresh commits there, read one after the other."""

    key: tuple[int, int]
    generation: int
    commits: int


def mark_of(netns_path: str) -> Mark | None:
    """The netns' mark now; None when it cannot be read."""
    try:
        key = FreshCommits.key_of(netns_path)
        return Mark(key, read_generation(netns_path), COMMITS.count(key))
    except (OSError, NftGenerationError):
        return None


def only_fresh_commits(before: Mark, after: Mark, expected: int) -> bool:
    """Whether the netns saw exactly `expected` commits between the two marks, every one of them a fresh
    batch of this process (the generation moves by one per commit, whoever makes it)."""
    if before.key != after.key or expected < 1:
        return False
    moved = (after.generation - before.generation) % (1 << 32)
    return moved == after.commits - before.commits == expected


@lru_cache(maxsize=64)
def _prepared(text: str, family: int) -> tuple[tuple[FreshTable, ...], bytes, int]:
    tables = read_fresh(text, family)
    data, acked = batch(tables, 1)
    return tables, data, acked


def restore_fresh_nft_here(family: int, text: str) -> str | None:
    """Apply `text` (a fresh restore text) in the calling thread's netns through nf_tables; None when
    done, else why it was declined (nothing changed)."""
    try:
        tables, data, acked = _prepared(text, family)
    except Unsupported as exc:
        return f"not built in-process: {exc}"
    declined = declined_here(data, acked)
    if declined is not None:
        return f"table {'/'.join(t.name for t in tables)} {declined}"
    COMMITS.note_here()
    return None

