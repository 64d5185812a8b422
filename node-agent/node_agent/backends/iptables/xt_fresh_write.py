"""Put a fresh restore text into a new pod netns' legacy iptables table in-process: no iptables-restore.

A new pod's rules (a sidecar ADD, an ambient enrolment) go into tables that hold nothing yet;
`iptables-legacy-restore` (~2 ms of process per family here) reads each table with two getsockopt
calls, lays it out again with our rules and hands it back with one setsockopt. `restore_fresh_here`
does the same from the calling thread (which is inside the pod netns), with the blob `xt_blob` lays
out, under the same xtables lock iptables takes (`/run/xtables.lock`, or `$XTABLES_LOCKFILE`; held by
another process: declined, and iptables-restore waits for it; the agent's own threads take turns):

1. the text is read (`xt_fresh_rules.read_fresh`): anything outside its grammar is declined;
2. per table, `IPT_SO_GET_INFO` / `IPT_SO_GET_ENTRIES`: it must be exactly what a new netns holds
   (every hook's chain empty with an ACCEPT policy), else declined: iptables-restore then applies the
   text (and refuses it the way it always does, e.g. when our chains exist);
3. per table, `IPT_SO_SET_REPLACE` with the new blob (the kernel swaps the whole table at once, or
   refuses it and changes nothing; it refuses with EAGAIN when the table changed since step 2), then
   `IPT_SO_SET_ADD_COUNTERS` gives the policies their counters back, as libiptc does. A refused table
   puts the tables of the text swapped before it back (iptables-legacy-restore would leave them).

`unrestore_fresh_here` is the way back for a pod's removal: the same reads must find exactly the blob
laid out from the text (nothing added or changed since), and each table gets the new netns' empty
chains back the same way.

The records and the blob of a text are kept (a node's pods share a few specs, hence a few texts).

Declined (returned reason) means nothing changed; the caller starts iptables-restore. The ip6tables
calls have the same numbers at SOL_IPV6.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import threading
from functools import lru_cache
from typing import NamedTuple

from cni.rules.xt_fresh_rules import FreshTable, Unsupported, read_fresh
from node_agent.backends.iptables.iptc_fingerprint import LAYOUTS
from node_agent.backends.iptables.xt_blob import Blob, layout, pristine
from node_agent.backends.iptables.xt_digest import (
    ENTRIES_HEADER,
    INFO,
    LEVELS,
    SO_GET_ENTRIES,
    SO_GET_INFO,
    XtDigestError,
    getsockopt_into,
    masked,
)

SO_SET_REPLACE, SO_SET_ADD_COUNTERS = 64, 65  # IPT_SO_* == IP6T_SO_*
REPLACE = struct.Struct("=32sIII5I5IIQ")  # struct ipt_replace up to its entries
COUNTERS_INFO = struct.Struct("=32sI4x")  # struct xt_counters_info up to its counters
COUNTER = struct.Struct("=QQ")
DEFAULT_LOCK = "/run/xtables.lock"
NOT_LAID_OUT = "not laid out in-process"  # how a decline for the text itself (not the tables' state) starts


# Most pods of a node share a handful of specs: the text → records → blob work is done once per text.
_read = lru_cache(maxsize=64)(read_fresh)
_layout = lru_cache(maxsize=64)(layout)
_pristine = lru_cache(maxsize=8)(pristine)
_OURS = threading.Lock()


def lock_path() -> str:
    return os.environ.get("XTABLES_LOCKFILE") or DEFAULT_LOCK


def restore_fresh_here(family: int, text: str) -> str | None:
    """Apply `text` (a fresh restore text) in the calling thread's netns; None when done, else why it
    was declined (nothing changed). Raises OSError only when a later table was refused and an earlier
    one could not be put back (then the tables are as iptables-restore would have left them: the earlier
    ones written)."""
    return _swap_tables(family, text, remove=False)


def unrestore_fresh_here(family: int, text: str) -> str | None:
    """The way back: every table of `text` that holds exactly what `restore_fresh_here` writes from it
    (nothing added, nothing changed since) gets its empty built-in chains back, as in a new netns; None
    when done, else why it was declined (nothing changed; the caller then removes with iptables-restore).
    OSError as for `restore_fresh_here`."""
    return _swap_tables(family, text, remove=True)


def _swap_tables(family: int, text: str, remove: bool) -> str | None:
    try:
        tables = _read(text, family)
    except Unsupported as exc:
        return f"{NOT_LAID_OUT}: {exc}"
    with _OURS:  # our own threads take turns (a write is a fraction of a millisecond) instead of declining
        try:
            lock = os.open(lock_path(), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            return f"xtables lock: {exc.strerror}"
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another process: iptables-restore waits for it (--wait)
                return "xtables lock busy"
            af = socket.AF_INET if family == 4 else socket.AF_INET6
            with socket.socket(af, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.IPPROTO_RAW) as sock:
                return _write(sock, tables, remove)
        except HalfWritten:
            raise
        except OSError as exc:
            return f"table {'/'.join(t.name for t in tables)}: {exc.strerror or exc}"
        finally:
            os.close(lock)  # releases the flock


class HalfWritten(OSError):
    """A later table was refused and an earlier one, already written, could not be put back."""


class _Plan(NamedTuple):
    table: FreshTable
    valid_hooks: int
    old: Blob  # what the table holds now (verified: the pristine layout, or ours when removing)
    new: Blob


def _write(sock: socket.socket, tables: tuple[FreshTable, ...], remove: bool) -> str | None:
    """Every table verified (new, or exactly ours when removing) and laid out first; then each swapped
    in, in order. A refused swap puts the tables swapped before it back as they were."""
    plans: list[_Plan] = []
    for table in tables:
        plan = _plan(sock, table, remove)
        if isinstance(plan, str):
            return plan
        plans.append(plan)
    for i, plan in enumerate(plans):
        refused = _swap(sock, plan.table, plan.valid_hooks, plan.new, plan.old.num_entries, counters_from=plan.old)
        if refused is None:
            continue
        for done in reversed(plans[:i]):
            back = _swap(sock, done.table, done.valid_hooks, done.old, done.new.num_entries)
            if back is not None:
                raise HalfWritten(0, f"{refused}; putting table {done.table.name} back failed: {back}")
        return refused
    return None


def _plan(sock: socket.socket, table: FreshTable, remove: bool) -> _Plan | str:
    family, level = table.family, LEVELS[table.family]
    name = table.name.encode()
    info_buf = ctypes.create_string_buffer(name, INFO.size)
    try:
        getsockopt_into(sock.fileno(), level, SO_GET_INFO, info_buf, f"table {table.name} info")
    except XtDigestError as exc:
        return str(exc)
    _, valid_hooks, *_, num_entries, size = INFO.unpack_from(info_buf.raw)
    try:
        empty, ours = _pristine(family, valid_hooks), _layout(table, valid_hooks)
    except Unsupported as exc:
        return f"{NOT_LAID_OUT}: {exc}"
    expected, wanted = (ours, empty) if remove else (empty, ours)
    state = "not what we wrote" if remove else "not empty"
    if num_entries != expected.num_entries or size != len(expected.entries):
        return f"table {table.name} is {state} ({num_entries} entries)"
    entries_buf = ctypes.create_string_buffer(ENTRIES_HEADER + size)
    struct.pack_into("=32sI", entries_buf, 0, name, size)
    try:
        getsockopt_into(sock.fileno(), level, SO_GET_ENTRIES, entries_buf, f"table {table.name} entries")
    except XtDigestError as exc:
        return str(exc)
    try:
        now = masked(entries_buf.raw[ENTRIES_HEADER:], LAYOUTS[family], comefrom=True)
    except ValueError as exc:
        return f"table {table.name}: {exc}"
    if now != masked(expected.entries, LAYOUTS[family], comefrom=True):
        return f"table {table.name} is {state} (a chain's policy or an entry differs)"
    return _Plan(table, valid_hooks, expected, wanted)


def _swap(sock: socket.socket, table: FreshTable, valid_hooks: int, blob: Blob, num_now: int,
          counters_from: Blob | None = None) -> str | None:
    """IPT_SO_SET_REPLACE of `table` with `blob` (the table holds `num_now` entries); why it was refused."""
    level, name = LEVELS[table.family], table.name.encode()
    old = ctypes.create_string_buffer(COUNTER.size * num_now)
    head = REPLACE.pack(name, valid_hooks, blob.num_entries, len(blob.entries), *blob.hook_entry, *blob.underflow,
                        num_now, ctypes.addressof(old))
    try:
        sock.setsockopt(level, SO_SET_REPLACE, head + blob.entries)
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return f"table {table.name} changed while it was read"
        return f"table {table.name} refused by the kernel: {exc.strerror}"
    if counters_from is not None:
        _restore_policy_counters(sock, level, name, blob, counters_from, old.raw)
    return None


def _restore_policy_counters(
    sock: socket.socket, level: int, name: bytes, new: Blob, old: Blob, counters: bytes
) -> None:
    """Add the old policies' packet and byte counts to the new policy entries (best effort: counters)."""
    values = [COUNTER.pack(0, 0)] * new.num_entries
    for was, now in zip(old.policies, new.policies, strict=True):
        values[now] = counters[was * COUNTER.size : (was + 1) * COUNTER.size]
    if all(v == COUNTER.pack(0, 0) for v in values):
        return
    try:
        sock.setsockopt(level, SO_SET_ADD_COUNTERS, COUNTERS_INFO.pack(name, new.num_entries) + b"".join(values))
    except OSError:
        pass
