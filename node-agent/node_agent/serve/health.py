"""HTTP endpoints of the agent: /metrics (Prometheus text), /healthz (alive), /readyz (ready to enrol)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from node_agent.kernel.unix_socket import wake_blocked

log = logging.getLogger("headrace.agent.health")

Check = Callable[[], tuple[bool, str]]


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

        self._server = ThreadingHTTPServer((host, port), _Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        # No poll interval: the thread sleeps until a connection; `stop` wakes it by shutting the socket.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(None,), name="health-http",
                                        daemon=True)
        self._thread.start()
        log.info("metrics and health on port %d", self.port, extra={"step": "http-listen"})

    def stop(self) -> None:
        stopper = threading.Thread(target=self._server.shutdown, name="health-http-stop", daemon=True)
        stopper.start()  # asks the loop to end, then waits for it
        wake_blocked(self._server.socket)  # the loop's select returns: it sees the request
        stopper.join(5)
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
