"""Who may hold a connection to the plugin-event socket: the admission policy of `serve/cni_server.py`.

A connection goes through two phases, each with its own bounded set of slots:

- **reading** (until its request line is complete): at most `max_reading` connections. One request has
  one deadline, counted from accept, for the whole line. When the set is full, a new connection does not
  wait and is not refused: the connection that has been reading the longest is evicted (answered
  "evicted" and closed). A real client (the plugin, `headrace status`) writes its whole request right
  after connecting, so it leaves this phase at its first read; only slow or stalled clients grow old
  here, and a stream of them can never keep a fresh request out.
- **handling** (the request is being answered; an ambient ADD waits for its enrolment): at most
  `max_handling`. Readers never take these slots, so slow clients cannot starve requests; a full set
  answers "agent busy" (retry).

Per peer (the SO_PEERCRED pid of the connecting process) at most `per_peer` connections in both phases
together: one process cannot take the slots of everybody else. The socket is mode 0600, so every peer is
root on a node; a per-uid bound would be the whole socket, so pids are what is counted. A peer whose pid
the kernel cannot map into the agent's pid namespace (pid 0: an agent without the host's pid namespace)
is keyed by its uid and not bounded per peer, since that key would bound every plugin of the node at
once; the global limits and the eviction still hold for it.

Pure bookkeeping (thread-safe, no sockets): the server does the closing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

MAX_READING = 64
MAX_HANDLING = 64
PER_PEER = 8


@dataclass(eq=False)
class Ticket:
    """One admitted connection."""

    peer: tuple[str, int]  # ("pid", pid) or ("uid", uid)
    accepted: float  # time.monotonic() at accept
    handling: bool = False
    evicted: bool = False
    closed: bool = False
    payload: object = field(default=None, repr=False)  # the server's socket


@dataclass(frozen=True)
class Refusal:
    reason: str


def peer_key(pid: int, uid: int) -> tuple[str, int]:
    return ("pid", pid) if pid > 0 else ("uid", uid)


class Admission:
    def __init__(self, max_reading: int = MAX_READING, max_handling: int = MAX_HANDLING,
                 per_peer: int = PER_PEER) -> None:
        self.max_reading = max_reading
        self.max_handling = max_handling
        self.per_peer = per_peer
        self._lock = threading.Lock()
        self._reading: list[Ticket] = []  # in accept order: the oldest first
        self._handling = 0
        self._per_peer: dict[tuple[str, int], int] = {}
        self.evictions = 0
        self.refused_peer = 0
        self.refused_busy = 0
        self.deadlines = 0  # requests not complete within their deadline (the server calls timed_out)

    def admit(self, peer: tuple[str, int], now: float, payload: object = None) -> tuple[Ticket | Refusal, list[Ticket]]:
        """A new connection: its ticket (or why it is refused) and the tickets evicted to make room,
        which the caller must close."""
        with self._lock:
            if peer[0] == "pid" and self._per_peer.get(peer, 0) >= self.per_peer:
                self.refused_peer += 1
                return Refusal(f"too many connections from pid {peer[1]} (at most {self.per_peer})"), []
            evicted: list[Ticket] = []
            while len(self._reading) >= self.max_reading:
                victim = self._reading.pop(0)
                victim.evicted = True
                self._drop_peer(victim.peer)
                self.evictions += 1
                evicted.append(victim)
            ticket = Ticket(peer, now, payload=payload)
            self._reading.append(ticket)
            self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
            return ticket, evicted

    def start_handling(self, ticket: Ticket) -> Refusal | None:
        """The ticket's request line is complete: None when it may be handled now (it holds a handling
        slot until `close`), else why not (evicted meanwhile, or every handling slot taken)."""
        with self._lock:
            if ticket.evicted or ticket.closed:
                return Refusal("evicted: the request was not sent in time")
            self._reading.remove(ticket)
            if self._handling >= self.max_handling:
                self.refused_busy += 1
                self._drop_peer(ticket.peer)
                ticket.closed = True
                return Refusal("agent busy")
            self._handling += 1
            ticket.handling = True
            return None

    def close(self, ticket: Ticket) -> None:
        """The connection is done (any phase); idempotent, and a no-op for an evicted ticket."""
        with self._lock:
            if ticket.closed or ticket.evicted:
                ticket.closed = True
                return
            ticket.closed = True
            if ticket.handling:
                self._handling -= 1
            else:
                self._reading.remove(ticket)
            self._drop_peer(ticket.peer)

    def _drop_peer(self, peer: tuple[str, int]) -> None:
        left = self._per_peer.get(peer, 0) - 1
        if left > 0:
            self._per_peer[peer] = left
        else:
            self._per_peer.pop(peer, None)

    def timed_out(self) -> None:
        """A request line was not complete within its deadline (answered and closed by the server)."""
        with self._lock:
            self.deadlines += 1

    def counts(self) -> dict[str, int]:
        """Now (reading, handling, peers) and since start (the rest): exported as metrics
        (serve/metrics.py PluginAdmissionCollector)."""
        with self._lock:
            return {"reading": len(self._reading), "handling": self._handling, "peers": len(self._per_peer),
                    "evictions": self.evictions, "refused_peer": self.refused_peer,
                    "refused_busy": self.refused_busy, "deadlines": self.deadlines}
