"""A tiny app for lab pods: a TCP echo server that tags every reply with its name.

Run inside a pod's netns: `nsenter --net=POD python -m node_agent.lab.appserver --port 8080 --label web`.
Each chunk received is answered with b"<label>|<chunk>", so long-lived connections can be exercised.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading


def _serve_conn(conn: socket.socket, label: bytes) -> None:
    with conn:
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            try:
                conn.sendall(label + b"|" + data)
            except OSError:
                return


def serve(port: int, label: str) -> None:
    socks = []
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port))
        s.listen(128)
        socks.append(s)

    def loop(s: socket.socket) -> None:
        while True:
            conn, _ = s.accept()
            threading.Thread(target=_serve_conn, args=(conn, label.encode()), daemon=True).start()

    threads = [threading.Thread(target=loop, args=(s,), daemon=True) for s in socks]
    for t in threads:
        t.start()
    print(f"listening on {port}", flush=True)
    for t in threads:
        t.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--label", required=True)
    args = parser.parse_args(argv)
    serve(args.port, args.label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
