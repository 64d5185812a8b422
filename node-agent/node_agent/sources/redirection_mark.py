"""The `ambient.istio.io/redirection: enabled` pod annotation, as istio-cni keeps it: set once the agent
enrolled an ambient pod (rules in, proxy acked), removed when the pod is no longer enrolled. Istio's
control plane and users read it.

Level-triggered: `changes` compares the reconciler's rows with the pods of the source (pure); the
`RedirectionMarker` thread applies the differences through a writer (a merge patch of the pod's status
subresource over the Kubernetes API, or the object file in objects-dir mode) and retries failures.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cni.contract.kube_objects import Pod

log = logging.getLogger("headrace.agent.annotation")

ANNOTATION = "ambient.istio.io/redirection"
ENABLED = "enabled"

# writer(namespace, name, enabled): put the annotation on (True) or take it off (False); raises on failure
Writer = Callable[[str, str, bool], None]


@dataclass(frozen=True)
class Change:
    uid: str
    namespace: str
    name: str
    enabled: bool


def merge_patch(enabled: bool) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that sets or removes the annotation."""
    return {"metadata": {"annotations": {ANNOTATION: ENABLED if enabled else None}}}


def changes(rows: Iterable[Mapping[str, Any]], pods: Mapping[str, Pod]) -> list[Change]:
    """What to write: enrolled ambient pods without `enabled`; pods with the annotation the reconciler
    does not hold as ambient (unenrolled). Pods held but not enrolled (pending, failed) are left as
    they are: their redirection is being retried."""
    held = {str(r["uid"]): r for r in rows if r.get("mode") == "ambient"}
    out: list[Change] = []
    for uid, pod in sorted(pods.items()):
        value = pod.annotations.get(ANNOTATION)
        row = held.get(uid)
        if row is not None and row.get("state") == "enrolled" and value != ENABLED:
            out.append(Change(uid, pod.namespace, pod.name, True))
        elif row is None and value is not None and not pod.deleting:
            out.append(Change(uid, pod.namespace, pod.name, False))
    return out


class RedirectionMarker:
    """Runs `changes` when woken (the store or the status changed) and every `interval` seconds (a write that
    failed is retried), once `ready` (the agent: the reconciler has made a pass over a source that had listed
    every pod and namespace; before, a pod whose namespace is not known yet is not held). A burst of
    changes (an enrolment wave) is written once it calms down: `settle` seconds without a change, at most
    `max_delay` after the first — the writes then neither compete with the enrolment nor repeat."""

    def __init__(
        self,
        rows: Callable[[], list[dict[str, Any]]],
        pods: Callable[[], Mapping[str, Pod]],
        ready: Callable[[], bool],
        writer: Writer,
        *,
        interval: float = 5.0,
        retry_after: float = 5.0,
        settle: float = 0.2,
        max_delay: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rows = rows
        self._pods = pods
        self._ready = ready
        self._writer = writer
        self.interval = interval
        self.retry_after = retry_after
        self.settle = settle
        self.max_delay = max_delay
        self._clock = clock
        self._sent: dict[str, tuple[bool, float]] = {}  # uid -> (what was written, when): no repeats
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.patched = 0
        self.failures = 0

    def wake(self) -> None:
        self._wake.set()

    def sync_once(self) -> int:
        """Write what differs; returns how many writes succeeded."""
        if not self._ready():
            return 0
        now = self._clock()
        done = 0
        wanted = changes(self._rows(), self._pods())
        live = {c.uid for c in wanted}
        self._sent = {uid: v for uid, v in self._sent.items() if uid in live}
        for c in wanted:
            last = self._sent.get(c.uid)
            if last is not None and last[0] == c.enabled and now - last[1] < self.retry_after:
                continue  # written (or failed) recently: the source has not caught up yet
            self._sent[c.uid] = (c.enabled, now)
            fields = {"pod": c.name, "namespace": c.namespace, "uid": c.uid, "step": "redirection-annotation"}
            try:
                self._writer(c.namespace, c.name, c.enabled)
            except Exception as exc:
                self.failures += 1
                log.warning("cannot %s the %s annotation: %s", "set" if c.enabled else "remove", ANNOTATION,
                            exc, extra=fields)
                continue
            self.patched += 1
            done += 1
            log.info("%s annotation %s", ANNOTATION, "set" if c.enabled else "removed", extra=fields)
        return done

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception:
                log.exception("redirection annotation pass failed", extra={"step": "redirection-annotation"})
            if self._wake.wait(self.interval):
                self._wake.clear()
                self._calm_down()

    def _calm_down(self) -> None:
        """Wait until no change came for `settle` seconds, or `max_delay` passed (monotonic wall time)."""
        deadline = time.monotonic() + self.max_delay
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or not self._wake.wait(min(self.settle, left)):
                return
            self._wake.clear()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="redirection-annotation", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
