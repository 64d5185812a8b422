"""The adoption gate: "the desired workload set is rebuilt", the one condition a proxy transport waits
for before it sends a node proxy a full snapshot.

After a restart the agent's desired set starts empty; a snapshot sent then would make the proxy drop
every workload (and close their listeners) although their rules are still in place. The reconciler opens
the gate once adoption has put every pod a previous agent enrolled (and whose netns is still pinned) back
into the desired set (`Adoption.adopt`). Transports (the gRPC hub, any other proxy protocol) take a
`SnapshotGate` and never build a snapshot before `ready()`; incremental updates wait with it.
"""

from __future__ import annotations

import threading
from typing import Protocol


class SnapshotGate(Protocol):
    def ready(self) -> bool:
        """Whether adoption is complete (snapshots may be sent)."""

    def wait_ready(self, timeout: float | None) -> bool:
        """Block until ready() or timeout; returns ready()."""


class AdoptionGate:
    """SnapshotGate opened once by the reconciler after adoption."""

    def __init__(self) -> None:
        self._open = threading.Event()

    def open(self) -> None:
        self._open.set()

    def ready(self) -> bool:
        return self._open.is_set()

    def wait_ready(self, timeout: float | None) -> bool:
        return self._open.wait(timeout)


class OpenGate:
    """A gate that is always open (a hub used without a reconciler, e.g. in tests)."""

    def ready(self) -> bool:
        return True

    def wait_ready(self, timeout: float | None) -> bool:
        return True
