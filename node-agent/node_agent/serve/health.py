"""HTTP endpoints of the agent: /metrics (Prometheus text), /healthz (alive), /readyz (ready to enrol).

The listener: `::` is dual-stack (one IPv6 socket with IPV6_V6ONLY off, so IPv4 clients reach it too: the
kubelet's probes on an IPv6-only or a dual-stack node), and plain IPv4 `0.0.0.0` where the host has no
IPv6 (the socket or the bind refused with EAFNOSUPPORT or EADDRNOTAVAIL); another IPv6 address listens on
IPv6 only, anything else on IPv4.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from node_agent.kernel.unix_socket import wake_blocked

log = logging.getLogger("headrace.agent.health")

Check = Callable[[], tuple[bool, str]]
ANY_V6 = "::"
NO_IPV6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)  # IPv6 disabled on the host (boot option or sysctl)


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6
    v6only = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(self.v6only))
        super().server_bind()


class _DualStackServer(_Server6):
    v6only = False


def listen(host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """The bound, listening server for `host` (see the module's doc)."""
    if host == ANY_V6:
        try:
            return _DualStackServer((host, port), handler)
        except OSError as exc:
            if exc.errno not in NO_IPV6:
                raise
            log.warning("no IPv6 on this host (%s): metrics and health listen on IPv4 only", exc.strerror,
                        extra={"step": "http-listen"})
            return _Server(("0.0.0.0", port), handler)
    if ":" in host:
        return _Server6((host, port), handler)
    return _Server((host, port), handler)


class HealthServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry, healthz: Check, readyz: Check) -> None:
        registry_ = registry

        class _Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(registry_), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    ok, why = (healthz if path == "/healthz" else readyz)()
                    self._reply(200 if ok else 503, (why + "\n").encode(), "text/plain; charset=utf-8")
                else:
                    self._reply(404, b"not found\n", "text/plain; charset=utf-8")

            def _reply(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = listen(host, port, _Handler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def dual_stack(self) -> bool:
        return isinstance(self._server, _DualStackServer)

    def start(self) -> None:
        # No poll interval: the thread sleeps until a connection; `stop` wakes it by shutting the socket.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(None,), name="health-http",
                                        daemon=True)
        self._thread.start()
        log.info("metrics and health on %s port %d%s", self.host, self.port,
                 " (IPv4 and IPv6)" if self.dual_stack else "", extra={"step": "http-listen"})

    def stop(self) -> None:
        stopper = threading.Thread(target=self._server.shutdown, name="health-http-stop", daemon=True)
        stopper.start()  # asks the loop to end, then waits for it
        wake_blocked(self._server.socket)  # the loop's select returns: it sees the request
        stopper.join(5)
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
