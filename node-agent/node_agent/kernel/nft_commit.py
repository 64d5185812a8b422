"""Send one nf_tables batch (`nft_messages.frame`) from the calling thread's netns and wait for the
kernel's verdict: the netlink socket is made by the calling thread, so the batch lands in the netns that
thread is in."""

from __future__ import annotations

import errno
import os
import socket

from node_agent.kernel import background_close, netlink_parse
from node_agent.kernel.netlink_parse import NETLINK_NETFILTER

TIMEOUT = 5.0
EXISTS = "exists"  # what `declined_here` answers when the batch creates something that is there


def commit_here(data: bytes, acked: int, timeout: float = TIMEOUT, close_later: bool = False) -> int:
    """0 when the whole batch was applied, else the errno the kernel answered (nothing applied: a failed
    message or commit aborts the transaction). OSError when the socket fails or no answer comes in time.
    `close_later`: the batch deletes tables, so the socket is closed in the background (`background_close`:
    that close waits for an RCU grace period)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    try:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        sock.send(data)
        error = _answers(sock, acked)
    except BaseException:
        sock.close()
        raise
    if close_later:
        background_close.later(sock.close)
    else:
        sock.close()
    return error


def declined_here(data: bytes, acked: int, close_later: bool = False) -> str | None:
    """`commit_here` for writers that decline rather than fail: None when applied, `EXISTS` when the kernel
    answered EEXIST, else what went wrong (the kernel's refusal or the socket's error); nothing applied."""
    try:
        error = commit_here(data, acked, close_later=close_later)
    except OSError as exc:
        return f"nf_tables: {exc.strerror or exc}"
    if error == errno.EEXIST:
        return EXISTS
    return f"refused by the kernel: {os.strerror(error)}" if error else None


def _answers(sock: socket.socket, acked: int) -> int:
    """Read the kernel's answers until the last change message's acknowledgement; the first error (0: all
    applied). A failed message aborts the whole batch (its error comes before that acknowledgement);
    so does a failed commit, which the kernel reports first, on the batch's first message."""
    while True:
        for msg_type, seq, payload in netlink_parse.messages(sock.recv(1 << 16)):
            if msg_type != netlink_parse.NLMSG_ERROR:
                continue
            code = netlink_parse.error_code(payload)
            if code:
                return code
            if seq == acked:
                return 0
