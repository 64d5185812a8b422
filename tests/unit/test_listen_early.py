"""The agent's early listener: the plugin socket listens before the agent is built, a client connecting
meanwhile waits in the backlog, and the server's listen_private takes the same socket over."""

from __future__ import annotations

import os
import socket

from node_agent.kernel import unix_socket


def test_client_waiting_in_the_backlog_is_served_by_the_later_server(tmp_path):
    path = str(tmp_path / "cni.sock")
    unix_socket.listen_early(path, 16)
    assert os.stat(path).st_mode & 0o777 == 0o600
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(path)  # accepted by the kernel before any server exists
        client.sendall(b"ADD\n")
        server = unix_socket.listen_private(path, 128)  # what the server does once built
        try:
            conn, _ = server.accept()
            with conn:
                assert conn.recv(10) == b"ADD\n"
        finally:
            server.close()


def test_replaced_file_is_not_taken_over(tmp_path):
    path = str(tmp_path / "cni.sock")
    unix_socket.listen_early(path, 16)
    os.unlink(path)
    os.mkfifo(path)  # something else now: the server's own bind reports it
    try:
        unix_socket.listen_private(path, 16)
    except FileExistsError as e:
        assert "not a socket" in str(e)
    else:
        raise AssertionError("a fifo at the socket path must be refused")


def test_early_listen_failure_is_left_to_the_server(tmp_path):
    path = tmp_path / "cni.sock"
    path.write_text("not a socket")
    unix_socket.listen_early(str(path), 16)  # no exception here
    assert path.read_text() == "not a socket"


def test_dropped_early_socket_is_closed_and_removed(tmp_path):
    path = str(tmp_path / "state" / "run" / "cni.sock")
    unix_socket.listen_early(path, 16)
    assert os.path.exists(path)
    unix_socket.drop_early(path)
    assert not os.path.exists(tmp_path / "state")  # nor the directories made for it
    unix_socket.drop_early(path)  # twice is fine
