"""Send one nf_tables batch (`cni.netlink.nft_messages.frame`) from the calling thread's netns and wait for
the kernel's verdict: the netlink socket is made by the calling thread, so the batch lands in the netns
that thread is in. Stdlib only and cheap to import (`_socket`, not `socket`): the CNI plugin's nftables
ADD sends its table this way; so do the agent's in-process writers."""

from __future__ import annotations

import _socket
import errno
import os

from cni.netlink import netlink_parse
from cni.netlink.netlink_parse import NETLINK_NETFILTER

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Callable

    # how a socket is closed: at once (None), or handed on (the agent's background closer)
    Closer = Callable[[Callable[[], None]], None]

TIMEOUT = 5.0
EXISTS = "exists"  # what `declined_here` answers when the batch creates something that is there


def commit_here(data: bytes, acked: int, timeout: float = TIMEOUT, close: Closer | None = None) -> int:
    """0 when the whole batch was applied, else the errno the kernel answered (nothing applied: a failed
    message or commit aborts the transaction). OSError when the socket fails or no answer comes in time.
    `close`: takes the socket's close instead of calling it now (a batch that deletes tables: that close
    waits for an RCU grace period, so the agent closes it in the background)."""
    sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    try:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        sock.send(data)
        error = _answers(sock, acked)
    except BaseException:
        sock.close()
        raise
    if close is not None:
        close(sock.close)
    else:
        sock.close()
    return error


def declined_here(data: bytes, acked: int, close: Closer | None = None) -> str | None:
    """`commit_here` for writers that decline rather than fail: None when applied, `EXISTS` when the kernel
    answered EEXIST, else what went wrong (the kernel's refusal or the socket's error); nothing applied."""
    try:
        error = commit_here(data, acked, close=close)
    except OSError as exc:
        return f"nf_tables: {exc.strerror or exc}"
    if error == errno.EEXIST:
        return EXISTS
    return f"refused by the kernel: {os.strerror(error)}" if error else None


def _answers(sock: _socket.socket, acked: int) -> int:
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
