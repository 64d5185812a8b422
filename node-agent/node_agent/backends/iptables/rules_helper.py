"""A child process that writes pods' iptables rules beside the agent: the rules part of an eBPF ambient
apply (the pod's inbound chains and policy routing), so that part runs on another CPU while the agent goes
on with the next pod's programs. The agent's Python threads share one interpreter lock, so a wave of
enrolments is otherwise one lane; here the rules are written by another interpreter.

The channel is a pair of pipes between the agent and its own child (`rules_helper_main`): frames of a
4-byte length and a pickled tuple, requests `(id, PodTarget, spec)`, replies `(id, error or None, digest
or None)`; the child first sends `(0, None, None)` once it has imported what it needs. The digest is the
nf_tables generation the child's own fresh write left (`IptablesBackend.recorded_if_fresh`), which the
agent records as verified (`IptablesBackend.adopt_written`).

The helper never holds up a pod: `submit` raises HelperGone while the child is not ready (starting, or
gone), and a reply that does not come within `reply_timeout` kills the child; the caller then writes the
rules itself. A child that exited is started again on a later `submit`, at most every `restart_after`
seconds. It exits when the agent closes the pipe (or dies).
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import IO, Any

from node_agent.backends.base import PodTarget, RedirectSpec
from node_agent.backends.env_switch import switched_on
from node_agent.backends.iptables.backend import IptablesBackend
from node_agent.kernel.home_netns import at_home, go_home

log = logging.getLogger("headrace.backend.rules_helper")

MAIN = "node_agent.backends.iptables.rules_helper_main"
HEAD = struct.Struct("<I")
MAX_FRAME = 1 << 20
READY = 0  # the id of the child's first frame
ENV = "HEADRACE_RULES_HELPER"  # 0/false/no/off: no helper (the agent writes every pod's rules itself)


def for_rules(rules: object, environ: Mapping[str, str] | None = None, cpus: int | None = None) -> RulesHelper | None:
    """A helper for an eBPF node's ambient rules backend: when it is an iptables one, the agent may use
    two CPUs or more (one CPU: the child would only add its hand-overs) and ENV does not turn it off."""
    if not isinstance(rules, IptablesBackend) or not switched_on(ENV, environ):
        return None
    return RulesHelper(rules.flavour) if (cpus or len(os.sched_getaffinity(0))) >= 2 else None


class HelperGone(Exception):
    """The helper cannot take or finish the request: the caller writes the rules itself."""


class FrameError(Exception):
    """A malformed frame on the channel."""


def write_frame(fd: int, obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    data = HEAD.pack(len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def read_frame(stream: IO[bytes]) -> Any:
    """The next frame's object; EOFError at the end of the stream, FrameError on a malformed frame."""
    head = stream.read(HEAD.size)
    if not head:
        raise EOFError
    if len(head) < HEAD.size:
        raise FrameError("truncated frame header")
    (size,) = HEAD.unpack(head)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes (at most {MAX_FRAME})")
    data = stream.read(size)
    if len(data) < size:
        raise FrameError("truncated frame")
    try:
        return pickle.loads(data)  # noqa: S301 - our own child on a pipe only the two ends hold
    except Exception as exc:
        raise FrameError(f"undecodable frame: {exc}") from exc


class RulesHelper:
    def __init__(self, flavour: str, *, reply_timeout: float = 10.0, restart_after: float = 5.0,
                 command: Sequence[str] | None = None) -> None:
        """command: the child's argv (default: this Python running MAIN for the flavour)."""
        self.flavour = flavour
        self.command = list(command) if command is not None else [sys.executable, "-m", MAIN, flavour]
        self.reply_timeout = reply_timeout
        self.restart_after = restart_after
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = False
        self._pending: dict[int, Future[bytes | None]] = {}
        self._ids = 0
        self._started_at = float("-inf")
        self._starting = False
        self._stopped = False
        self.starts = 0  # children started
        self.answered = 0  # requests the children answered

    @property
    def ready(self) -> bool:
        return self._ready

    def start(self) -> None:
        """Start the child unless it runs or is starting (returns at once: requests go to it once it says
        it is ready)."""
        with self._lock:
            if not self._stopped and self._proc is None and not self._starting:
                self._starting = True
                self._started_at = time.monotonic()
                threading.Thread(target=self._spawn, name="rules-helper-replies", daemon=True).start()

    def _spawn(self) -> None:
        """On a thread of its own, which then reads the replies: moved to the agent's own netns first (the
        caller may be applying inside a pod netns, which the child would otherwise start in and keep)."""
        try:
            if not at_home():
                go_home()
            proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        except OSError as exc:
            log.warning("rules helper not started: %s", exc, extra={"event": "rules_helper_failed"})
            with self._lock:
                self._starting = False
            return
        with self._lock:
            self._starting = False
            stale = self._stopped  # stopped while it started
            if not stale:
                self._proc, self._ready = proc, False
                self.starts += 1
        if stale:  # nothing for it to finish: gone at once, not after the agent's own end
            _end(proc, kill=True)
            return
        self._read(proc)

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        why = "exited"
        try:
            while True:
                rid, error, digest = read_frame(proc.stdout)
                if rid == READY:
                    self._ready = True
                    log.info("rules helper ready", extra={"event": "rules_helper_ready", "pid": proc.pid})
                    continue
                with self._lock:
                    fut = self._pending.pop(rid, None)
                    self.answered += 1
                if fut is None:
                    continue
                if error is None:
                    fut.set_result(digest)
                else:
                    fut.set_exception(RulesError(str(error)))
        except EOFError:
            pass
        except (FrameError, OSError, TypeError, ValueError) as exc:
            why = f"sent a bad reply ({exc})"
        self._gone(proc, why, kill=why != "exited")
        proc.stdout.close()

    def _gone(self, proc: subprocess.Popen[bytes], why: str, *, kill: bool = False) -> None:
        with self._lock:
            if self._proc is not proc:
                return
            self._proc, self._ready = None, False
            pending, self._pending = self._pending, {}
        _end(proc, kill=kill)
        for fut in pending.values():
            fut.set_exception(HelperGone(f"rules helper {why}"))
        if not self._stopped:
            log.warning("rules helper %s; pods' rules are written by the agent until it is back", why,
                        extra={"event": "rules_helper_gone", "pid": proc.pid})

    def submit(self, target: PodTarget, spec: RedirectSpec) -> Future[bytes | None]:
        """Hand one pod's rules to the child; the future's result is the digest to record (or None), its
        exception RulesError (the child's apply failed) or HelperGone. Raises HelperGone at once when the
        child is not ready (one that is gone is started again, at most every `restart_after`)."""
        with self._lock:
            proc = self._proc
            if proc is not None and self._ready and proc.stdin is not None:
                self._ids += 1
                fut: Future[bytes | None] = Future()
                self._pending[self._ids] = fut
                try:
                    write_frame(proc.stdin.fileno(), (self._ids, target, spec))
                except OSError as exc:
                    del self._pending[self._ids]
                    raise HelperGone(f"rules helper: {exc}") from exc
                return fut
            starting = proc is not None or self._starting
            due = not starting and time.monotonic() - self._started_at >= self.restart_after
        if due:
            self.start()
        raise HelperGone("rules helper still starting" if starting else "rules helper not running")

    def result(self, fut: Future[bytes | None]) -> bytes | None:
        """Wait for a submitted request; a child that does not answer within reply_timeout is killed."""
        try:
            return fut.result(timeout=self.reply_timeout)
        except TimeoutError:
            with self._lock:
                proc = self._proc
            if proc is not None:
                self._gone(proc, f"did not answer within {self.reply_timeout:g} s", kill=True)
            raise HelperGone("rules helper stuck") from None

    def stop(self) -> None:
        """Agent shutdown: the child is told (its input closed) and waited for, or killed when it is not
        ready yet (it holds no request); nothing starts again."""
        with self._lock:
            self._stopped = True
            proc, ready = self._proc, self._ready
        if proc is not None:
            self._gone(proc, "stopped", kill=not ready)


class RulesError(Exception):
    """The child's apply failed (its BackendError's text)."""


def _end(proc: subprocess.Popen[bytes], *, kill: bool) -> None:
    """The child told to go (its input closed; killed when stuck or after 2 s). Its output is closed by
    the reply reader, which sees it end."""
    if kill:
        proc.kill()
    try:
        if proc.stdin is not None:
            proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
