"""Read a pod's legacy iptables tables in-process with python-iptables (`iptc`), from inside its netns.

Why: the agent's drift check otherwise runs `nsenter iptables-legacy-save` per family per pod every
`--drift-interval`; libiptc reads the same tables with two getsockopt calls and no process.

How: python-iptables binds libip4tc/libip6tc, whose handle reads the table of the netns its raw socket
was made in; `setns` moves only the calling thread. The reads therefore run in one long-lived worker
thread (`_NetnsWorker`) that, per read, enters the pod netns, initialises the tables there (fresh
handles: `Table.refresh`, since python-iptables caches its Table objects per process), copies the raw
rule entries out, closes the handles and goes back to its home netns (the creator's) before it takes
the next read; the caller waits at most `timeout`. Only tables the kernel lists in that netns
(`/proc/thread-self/net/ip{,6}_tables_names`) are read: opening a missing legacy table would create it.
python-iptables keeps process-global state (table cache, libxtables globals), so reads are serialised
by one lock. Nothing here writes: handles are opened with autocommit off and freed unused.

Loading: importing iptc costs ~0.25 s (and runs `ldconfig` unless XTABLES_LIBDIR is set), so it happens
once, in a background thread started by the first read attempt; reads before it is loaded (or when it
cannot load) raise IptcUnavailable and the caller uses the iptables-save path. python-iptables drives
legacy tables only: never use this on an nft host.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from cni.kernel.netns import THREAD_NETNS, NetnsReturnError, enter, entered
from node_agent.backends.iptables.iptc_fingerprint import (
    LAYOUTS,
    Chains,
    EntryLayout,
    RuleKey,
    fingerprint,
    rule_key,
    table_names,
)

log = logging.getLogger("headrace.backend.iptc")

# Debian/Ubuntu multiarch first, then the usual single-arch places.
XTABLES_DIRS = (
    "/usr/lib/x86_64-linux-gnu/xtables",
    "/usr/lib/aarch64-linux-gnu/xtables",
    "/usr/lib64/xtables",
    "/usr/lib/xtables",
    "/lib/xtables",
)
NAMES_FILES = {4: "/proc/thread-self/net/ip_tables_names", 6: "/proc/thread-self/net/ip6_tables_names"}

# python-iptables' Table cache and libxtables' globals are per process: one read at a time.
_IPTC_LOCK = threading.Lock()


class IptcUnavailable(Exception):
    """python-iptables is not loaded (yet), could not be loaded, or the reader gave up on it."""


class IptcReadError(Exception):
    """The in-process read of a pod's tables failed (the caller falls back to iptables-save)."""


def prepare_env(dirs: Sequence[str] = XTABLES_DIRS) -> str | None:
    """Point python-iptables at the xtables extension dir (else its import runs `ldconfig -N -v` to
    find it). Call while the process is still single-threaded (backend construction): it sets an
    environment variable. An existing XTABLES_LIBDIR is kept. Returns the value in effect."""
    current = os.environ.get("XTABLES_LIBDIR")
    if current:
        return current
    for d in dirs:
        if os.path.isdir(d):
            os.environ["XTABLES_LIBDIR"] = d
            return d
    return None


def _import_iptc() -> ModuleType:
    return importlib.import_module("iptc")


def entry_layouts(iptc: Any) -> dict[int, EntryLayout]:
    """The ipt_entry / ip6t_entry layouts as python-iptables' ctypes structs define them."""
    out: dict[int, EntryLayout] = {}
    for family, struct_type in ((4, iptc.ip4tc.ipt_entry), (6, iptc.ip6tc.ip6t_entry)):
        out[family] = EntryLayout(
            ip_len=struct_type.nfcache.offset,
            header_len=struct_type.elems.offset,
            offsets_at=struct_type.target_offset.offset,
        )
        if struct_type.next_offset.offset != out[family].offsets_at + 2:
            raise ImportError(f"unexpected IPv{family} entry layout in python-iptables")
    return out


def table_names_here(family: int) -> list[str]:
    """The legacy tables of `family` the kernel has in the calling thread's netns (only these may be read:
    opening a missing one would create it); [] when that family's legacy tables are not in the kernel."""
    try:
        with open(NAMES_FILES[family], encoding="ascii") as f:
            return table_names(f.read())
    except FileNotFoundError:
        return []


def _read_tables_here(
    iptc: Any, families: Sequence[int], layouts: dict[int, EntryLayout] = LAYOUTS
) -> dict[int, dict[str, Chains]]:
    """Every existing table of the given families in the calling thread's netns: chains in libiptc's
    order, each with its rules as RuleKeys. Called with _IPTC_LOCK held."""
    out: dict[int, dict[str, Chains]] = {}
    for family in families:
        names = table_names_here(family)
        cls = iptc.Table if family == 4 else iptc.Table6
        tables: dict[str, Chains] = {}
        for name in names:
            table = cls(name, autocommit=False)  # cached per process: re-init in this netns below
            try:
                table.refresh()
                chains: list[tuple[str, list[RuleKey]]] = []
                for chain in [c.name for c in table.chains]:
                    rules: list[RuleKey] = []
                    entry = table.first_rule(chain)
                    while entry:
                        raw = ctypes.string_at(ctypes.addressof(entry), entry.next_offset)
                        verdict = table.get_target(entry)
                        target = verdict.decode("ascii", "replace") if verdict else ""
                        rules.append(rule_key(raw, family, target, layouts[family]))
                        entry = table.next_rule(entry)
                    chains.append((chain, rules))
                tables[name] = chains
            finally:
                table.close()  # autocommit off: frees the handle, writes nothing
        out[family] = tables
    return out


class _Job:
    __slots__ = ("done", "error", "families", "netns_path", "result")

    def __init__(self, netns_path: str, families: tuple[int, ...]) -> None:
        self.netns_path = netns_path
        self.families = families
        self.result: dict[int, dict[str, Chains]] | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class _NetnsWorker:
    """One long-lived thread doing the reads: for each job it enters the pod netns, reads, and goes back
    to its home netns (the one of the thread that created it) before taking the next job. If it cannot
    go home it ends at once (a thread's netns goes with it; the next read starts a new worker). Saves a
    thread start per check (~0.1 ms of CPU, a fifth of an in-process check)."""

    def __init__(self, iptc: Any, layouts: dict[int, EntryLayout], lock_timeout: float) -> None:
        self.iptc = iptc
        self.layouts = layouts
        self.lock_timeout = lock_timeout
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.alive = True
        self.home = os.open(THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)  # the caller's netns
        self.thread = threading.Thread(target=self._run, name="headrace-iptc-read", daemon=True)
        try:
            self.thread.start()
        except BaseException:
            os.close(self.home)
            raise

    def submit(self, job: _Job) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(self.lock_timeout)

    def _run(self) -> None:
        try:
            enter(self.home)  # start from the creator's netns even if this thread began elsewhere
            while True:
                job = self.jobs.get()
                if job is None or not self._do(job):
                    return
        except OSError as exc:
            log.error("iptc reader thread cannot enter its home netns: %s", exc, extra={"step": "iptc-read"})
        finally:
            self.alive = False
            os.close(self.home)
            while True:  # jobs that raced with the end: fail them, do not leave them waiting
                try:
                    pending = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if pending is not None:
                    pending.error = IptcReadError("the iptc reader thread ended")
                    pending.done.set()

    def _do(self, job: _Job) -> bool:
        """One read; False when this thread could not get back home (it must end)."""
        if not _IPTC_LOCK.acquire(timeout=self.lock_timeout):
            job.error = IptcReadError("python-iptables is busy (lock not acquired)")
            job.done.set()
            return True
        try:
            try:
                with entered(job.netns_path):  # EINVAL if it is not a network namespace
                    try:
                        job.result = _read_tables_here(self.iptc, job.families, self.layouts)
                    except BaseException as exc:
                        job.error = exc
            except NetnsReturnError as exc:
                log.error("iptc reader thread cannot go back to its netns, ending it: %s", exc,
                          extra={"step": "iptc-read", "netns": job.netns_path})
                job.result, job.error = None, IptcReadError(f"cannot leave {job.netns_path}: {exc}")
                return False
            except BaseException as exc:  # never left home
                job.error = exc
            return True
        finally:
            _IPTC_LOCK.release()
            job.done.set()


class IptcReader:
    """In-process reads of legacy tables inside a netns. Thread-safe; one per process is enough
    (`shared_reader()`)."""

    def __init__(self, timeout: float = 5.0, loader: Callable[[], ModuleType] = _import_iptc) -> None:
        self.timeout = timeout
        self._loader = loader
        self._state = threading.Lock()
        self._loaded = threading.Event()
        self._thread: threading.Thread | None = None
        self._iptc: ModuleType | None = None
        self._layouts: dict[int, EntryLayout] = LAYOUTS
        self._error: str | None = None
        self._worker: _NetnsWorker | None = None

    # ---- loading -----------------------------------------------------------------------------------
    def start_loading(self) -> None:
        """Import python-iptables in a background thread (idempotent, returns at once)."""
        with self._state:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._load, name="headrace-iptc-load", daemon=True)
            self._thread.start()

    def _load(self) -> None:
        try:
            mod = self._loader()
            for attr in ("Table", "Table6"):
                if not hasattr(mod, attr):
                    raise ImportError(f"iptc has no {attr}")
            self._layouts = entry_layouts(mod)
            self._iptc = mod
            log.info("python-iptables loaded: in-process drift checks on", extra={"step": "iptc-load"})
        except Exception as exc:  # any import-time failure (missing libip4tc, ldconfig, ...) disables us
            self._error = f"python-iptables unavailable: {type(exc).__name__}: {exc}"
            log.warning("%s; drift checks use iptables-save", self._error, extra={"step": "iptc-load"})
        finally:
            self._loaded.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Start loading if needed and wait; True when reads can be made."""
        self.start_loading()
        self._loaded.wait(timeout)
        return self.ready()

    def ready(self) -> bool:
        return self._iptc is not None and self._error is None

    @property
    def error(self) -> str | None:
        return self._error

    # ---- reading -----------------------------------------------------------------------------------
    def read(self, netns_path: str, families: Sequence[int]) -> dict[int, dict[str, Chains]]:
        """All existing tables of `families` inside netns_path. IptcUnavailable when python-iptables is
        not usable (loading is started); IptcReadError when the read itself failed."""
        if not self.ready():
            self.start_loading()
            raise IptcUnavailable(self._error or "python-iptables is still loading")
        fams = tuple(families)
        if not fams or any(f not in (4, 6) for f in fams):
            raise ValueError(f"address families must be 4 and/or 6, not {families!r}")
        job = _Job(netns_path, fams)
        with self._state:
            if self._worker is None or not self._worker.alive:
                self._worker = _NetnsWorker(self._iptc, self._layouts, self.timeout)
            worker = self._worker
        worker.submit(job)
        if not job.done.wait(self.timeout):
            # A read that hangs (should never happen: two getsockopt calls per table) keeps the worker
            # and the lock: stop using python-iptables for good rather than pile up threads.
            self._error = f"in-process iptables read of {netns_path} did not finish within {self.timeout:.0f} s"
            log.error("%s; drift checks use iptables-save from now on", self._error, extra={"step": "iptc-read"})
            raise IptcReadError(self._error)
        if job.error is not None:
            exc = job.error
            if isinstance(exc, IptcReadError):
                raise exc
            raise IptcReadError(f"in-process iptables read of {netns_path}: {type(exc).__name__}: {exc}") from exc
        assert job.result is not None
        return job.result

    def close(self) -> None:
        """Stop the worker thread (it is at home when it ends); a later read starts a new one."""
        with self._state:
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop()

    def fingerprint(self, netns_path: str, families: Sequence[int], prefix: str) -> bytes:
        """The fingerprint (iptc_fingerprint.fingerprint) of our part of netns_path's tables."""
        return fingerprint(self.read(netns_path, families), prefix)


_shared: IptcReader | None = None
_shared_lock = threading.Lock()


def shared_reader() -> IptcReader:
    """The process's reader (python-iptables state is per process anyway)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = IptcReader()
        return _shared
