"""Put a fresh restore text into a new pod netns' iptables-nft table in-process: no iptables-nft-restore.

The nft counterpart of `xt_fresh_write`: the text is read (`xt_fresh_rules.read_fresh`), the batch
iptables-nft would send is built (`nft_compat_batch`) and sent on a netfilter netlink socket made by
the calling thread (which is inside the pod netns); the kernel applies the batch as one transaction.
Its tables come with NLM_F_EXCL: where one exists already (anything at all of iptables-nft's in that
table and family), the batch fails with EEXIST and changes nothing, and the text goes to iptables-nft-restore
as before. So does anything the reader or the batch builder does not lay out. The kernel's answer to
every message is read; any error means the transaction was aborted.
"""

from __future__ import annotations

import errno
import os
import socket
from functools import lru_cache

from node_agent.backends.iptables.nft_compat_batch import batch
from node_agent.backends.iptables.nft_generation import NETLINK_NETFILTER
from node_agent.backends.iptables.xt_fresh_rules import FreshTable, Unsupported, read_fresh
from node_agent.kernel import netlink_parse

TIMEOUT = 5.0


@lru_cache(maxsize=64)
def _prepared(text: str, family: int) -> tuple[tuple[FreshTable, ...], bytes, tuple[int, ...]]:
    tables = read_fresh(text, family)
    data, acked = batch(tables, 1)
    return tables, data, tuple(acked)


def restore_fresh_nft_here(family: int, text: str) -> str | None:
    """Apply `text` (a fresh restore text) in the calling thread's netns through nf_tables; None when
    done, else why it was declined (nothing changed)."""
    try:
        tables, data, acked = _prepared(text, family)
    except Unsupported as exc:
        return f"not built in-process: {exc}"
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER) as sock:
            sock.settimeout(TIMEOUT)
            sock.bind((0, 0))
            sock.send(data)
            error = _answers(sock, set(acked))
    except OSError as exc:
        return f"nf_tables: {exc.strerror or exc}"
    names = "/".join(t.name for t in tables)
    if error == errno.EEXIST:
        return f"table {names} exists"
    if error:
        return f"table {names} refused by the kernel: {os.strerror(error)}"
    return None


def _answers(sock: socket.socket, waiting: set[int]) -> int:
    """Read the kernel's answers until every change message is acknowledged; the first error (0: all
    applied). A failed message aborts the whole batch; so does a failed commit, which the kernel reports
    first, on the batch's first message."""
    while waiting:
        for msg_type, seq, payload in netlink_parse.messages(sock.recv(1 << 16)):
            if msg_type != netlink_parse.NLMSG_ERROR:
                continue
            code = netlink_parse.error_code(payload)
            if code:
                return code
            waiting.discard(seq)
    return 0
