"""Real TCP/UDP traffic inside test namespaces: listeners that record where connections arrived, clients.

    with Listener(pod.netns.path, 15001) as l:            # 0.0.0.0 (or :: with family=6) inside the netns
        reply = tcp_request(pod.netns.path, peer_ip, 8080)  # app (root) connects to a peer
        conn = l.wait_one()                                  # arrived here; conn.original_dst = (peer_ip, 8080)

A listener replies b"<label>|<first bytes received>" so the client sees who answered. Clients can run as
another uid (uid=1337 runs a small child process with /usr/bin/python3) or with an SO_MARK (mark=0x539).

cgroup=DIR (a pod's cgroup v2 directory, `pod.cgroup` of a SimNode made with pod_cgroups=True) runs the
client, or the listener, as a child process that joins that cgroup first: cgroup eBPF programs (connect,
getsockopt for SO_ORIGINAL_DST) only act on the processes of their cgroup, as on a real node.
"""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cni.kernel.netns import entered
from node_agent.lab.listener_child import Address, handle, listening_socket
from node_agent.lab.tcp_client import datagram, exchange, family_of

CLIENT_SCRIPT = Path(__file__).with_name("tcp_client.py")
LISTENER_SCRIPT = Path(__file__).with_name("listener_child.py")


@dataclass
class Accepted:
    peer: tuple[str, int]
    local: tuple[str, int]
    original_dst: tuple[str, int] | None
    data: bytes


class Listener:
    """A TCP listener inside a netns, served by a thread; records each accepted connection."""

    def __init__(
        self,
        netns_path: str,
        port: int,
        *,
        family: int = 4,
        addr: str | None = None,
        label: str | None = None,
        reply: bool = True,
        cgroup: str | None = None,
        transparent: bool = False,
    ) -> None:
        self.netns_path = netns_path
        self.transparent = transparent  # IP_TRANSPARENT: a TPROXY listener
        self.port = port
        self.family = socket.AF_INET6 if family == 6 else socket.AF_INET
        self.addr = addr if addr is not None else ("::" if family == 6 else "0.0.0.0")
        self.label = label or f"listener:{port}"
        self.reply = reply
        self.accepted: queue.Queue[Accepted] = queue.Queue()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.cgroup = cgroup
        self._child: subprocess.Popen[str] | None = None

    def __enter__(self) -> Listener:
        if self.cgroup is not None:
            self._start_child()
            return self
        with entered(self.netns_path):
            s = listening_socket(6 if self.family == socket.AF_INET6 else 4, self.addr, self.port, self.transparent)
        s.settimeout(0.2)
        self._sock = s
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def _start_child(self) -> None:
        """The listener as a child process inside the cgroup; its JSON lines feed self.accepted."""
        spec = {
            "family": 6 if self.family == socket.AF_INET6 else 4,
            "addr": self.addr,
            "port": self.port,
            "label": self.label,
            "reply": self.reply,
            "cgroup": self.cgroup,
            "transparent": self.transparent,
        }
        child = subprocess.Popen(
            ["nsenter", f"--net={self.netns_path}", "--", "/usr/bin/python3", str(LISTENER_SCRIPT), json.dumps(spec)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._child = child
        assert child.stdout is not None
        first = child.stdout.readline()
        if not first:
            err = child.stderr.read() if child.stderr is not None else ""
            child.wait(5)
            self._child = None
            raise OSError(f"listener on port {self.port} in cgroup {self.cgroup} failed: {err.strip()}")
        self._thread = threading.Thread(target=self._read_child, args=(child,), daemon=True)
        self._thread.start()

    def _read_child(self, child: subprocess.Popen[str]) -> None:
        assert child.stdout is not None
        for line in child.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            odst = obj.get("original_dst")
            self.accepted.put(
                Accepted(
                    (str(obj["peer"][0]), int(obj["peer"][1])),
                    (str(obj["local"][0]), int(obj["local"][1])),
                    (str(odst[0]), int(odst[1])) if odst else None,
                    bytes.fromhex(obj["data"]),
                )
            )

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn, peer), daemon=True).start()

    def _handle(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        handle(conn, peer, self.label, self.reply, self._report)

    def _report(self, peer: Address, local: Address, odst: Address | None, data: bytes) -> None:
        self.accepted.put(Accepted(peer, local, odst, data))

    def wait_one(self, timeout: float = 5.0) -> Accepted:
        return self.accepted.get(timeout=timeout)

    def count(self) -> int:
        return self.accepted.qsize()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._child is not None:
            self._child.kill()
            self._child.wait(5)
            for pipe in (self._child.stdout, self._child.stderr):
                if pipe is not None:
                    pipe.close()
            self._child = None
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=2)


def _run_client(netns_path: str, spec: dict[str, object], timeout: float) -> str:
    """tcp_client.py in a child process inside netns_path (it joins spec's cgroup, then drops to its
    gid/uid); its stdout. ConnectionError when it fails."""
    argv = ["nsenter", f"--net={netns_path}", "--", "/usr/bin/python3", str(CLIENT_SCRIPT), json.dumps(spec)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10)
    if proc.returncode != 0:
        what = "udp client" if spec.get("udp") else "client"
        raise ConnectionError(
            f"{what} (cgroup {spec.get('cgroup')}, uid {spec.get('uid')}) to {spec['host']}:{spec['port']} failed: "
            f"{proc.stderr.strip()}"
        )
    return proc.stdout


def tcp_request(
    netns_path: str,
    host: str,
    port: int,
    payload: bytes = b"ping",
    *,
    timeout: float = 3.0,
    uid: int | None = None,
    gid: int | None = None,
    mark: int | None = None,
    source: str | None = None,
    cgroup: str | None = None,
) -> bytes:
    """Connect from inside netns_path to host:port, send payload, return the reply (until EOF).

    uid/gid: run the client as that user in a child process (the proxy's uid 1337 in sidecar tests).
    mark: set SO_MARK on the socket (the node proxy's 0x539 in ambient tests). Raises OSError on failure.
    cgroup: run the client in a child process inside that cgroup v2 directory (then as uid/gid if given).
    """
    if cgroup is not None or uid is not None or gid is not None:
        # A child process: it joins the cgroup first, then drops to gid/uid (tcp_client.py).
        spec = {
            "host": host,
            "port": port,
            "payload": payload.decode(),
            "timeout": timeout,
            "mark": mark,
            "source": source,
            "cgroup": cgroup,
            "uid": uid,
            "gid": gid,
        }
        return bytes.fromhex(_run_client(netns_path, spec, timeout).strip())
    with entered(netns_path):
        s = socket.socket(family_of(host), socket.SOCK_STREAM)
    return exchange(s, host, port, payload, timeout, mark, source)


def udp_request(
    netns_path: str,
    host: str,
    port: int,
    payload: bytes = b"q",
    *,
    timeout: float = 2.0,
    cgroup: str | None = None,
    uid: int | None = None,
    gid: int | None = None,
) -> tuple[bytes, tuple[str, int]]:
    """Send one datagram from inside netns_path to host:port; (the reply, the address it came from).
    cgroup/uid/gid: as for tcp_request (a child process joins the cgroup, then drops to gid/uid)."""
    if cgroup is not None or uid is not None or gid is not None:
        spec = {"host": host, "port": port, "payload": payload.hex(), "timeout": timeout, "udp": True,
                "cgroup": cgroup, "uid": uid, "gid": gid}
        out = json.loads(_run_client(netns_path, spec, timeout))
        return bytes.fromhex(out["data"]), (str(out["peer"][0]), int(out["peer"][1]))
    with entered(netns_path):
        s = socket.socket(family_of(host), socket.SOCK_DGRAM)
    return datagram(s, host, port, payload, timeout)


@contextmanager
def udp_responder(
    netns_path: str, port: int, family: int = 4, label: bytes = b"udp", *, addr: str | None = None
) -> Iterator[list[tuple[str, int]]]:
    """A UDP socket in the netns (on addr, default the wildcard) answering label|payload to each datagram
    from where it arrived; yields the list of senders seen. A DNS proxy stand-in binds 127.0.0.1:15053:
    REDIRECT sends a locally generated packet to 127.0.0.1, and answering from there lets conntrack turn
    the reply's source back into the server the app asked."""
    with entered(netns_path):
        s = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if family == 6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr if addr is not None else ("::" if family == 6 else "0.0.0.0"), port))
        s.settimeout(0.2)
    except BaseException:
        s.close()
        raise
    seen: list[tuple[str, int]] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = s.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            seen.append((peer[0], peer[1]))
            s.sendto(label + b"|" + data, peer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield seen
    finally:
        stop.set()
        s.close()
        t.join(timeout=2)
