"""Flush a legacy iptables table through io_uring, as an attacker in a pod netns could: no setsockopt(2).

`python -m tests.kernel.uring_flush <netns path> <table> [--after-stdin]` (run as its own process: a change
count ignores the process that runs it). Inside the netns it replaces the IPv4 table with empty accepting
built-in chains by one io_uring socket command (IORING_OP_URING_CMD, SOCKET_URING_OP_SETSOCKOPT,
IPT_SO_SET_REPLACE). With --after-stdin the command is linked behind a read of one byte from stdin: it is
submitted at once ("submitted" on stdout) and runs only once a byte arrives. Prints the command's result
(0, or a negative errno) and exits 0 when it is 0.
"""

from __future__ import annotations

import ctypes
import mmap
import socket
import struct
import sys

from node_agent.backends.iptables.xt_blob import pristine
from node_agent.backends.iptables.xt_digest import INFO, SO_GET_INFO, getsockopt_into
from node_agent.backends.iptables.xt_fresh_write import REPLACE, SO_SET_REPLACE

from cni.kernel.netns import enter, libc

SYS_IO_URING_SETUP, SYS_IO_URING_ENTER = 425, 426
OFF_SQES = 0x10000000
OP_READ, OP_URING_CMD = 22, 46
SQE_IO_LINK = 1 << 2
SOCKET_URING_OP_SETSOCKOPT = 3
ENTER_GETEVENTS = 1
ENTRIES = 4


class Ring:
    def __init__(self) -> None:
        params = ctypes.create_string_buffer(120)
        fd = int(libc().syscall(SYS_IO_URING_SETUP, ENTRIES, params))
        if fd < 0:
            raise OSError(ctypes.get_errno(), "io_uring_setup")
        self.fd = fd
        sq_entries, cq_entries = struct.unpack_from("=II", params.raw, 0)
        self.sq = dict(zip(("head", "tail", "mask", "entries", "flags", "dropped", "array"),  # offsets in the ring
                           struct.unpack_from("=7I", params.raw, 40), strict=True))
        self.cq = dict(zip(("head", "tail", "mask", "entries", "overflow", "cqes"),
                           struct.unpack_from("=6I", params.raw, 80), strict=True))
        size = max(self.sq["array"] + sq_entries * 4, self.cq["cqes"] + cq_entries * 16)
        self.ring = mmap.mmap(fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ | mmap.PROT_WRITE)
        self.sqes = mmap.mmap(fd, sq_entries * 64, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                              mmap.PROT_READ | mmap.PROT_WRITE, offset=OFF_SQES)
        # the offsets name where each field is in the shared ring; the masks are read from there
        self.sq_mask, self.cq_mask = (struct.unpack_from("=I", self.ring, self.sq["mask"])[0],
                                      struct.unpack_from("=I", self.ring, self.cq["mask"])[0])
        self.queued = 0

    def queue(self, sqe: bytes) -> None:
        tail = struct.unpack_from("=I", self.ring, self.sq["tail"])[0]
        index = tail & self.sq_mask
        self.sqes[index * 64 : index * 64 + 64] = sqe.ljust(64, b"\0")
        struct.pack_into("=I", self.ring, self.sq["array"] + index * 4, index)
        struct.pack_into("=I", self.ring, self.sq["tail"], tail + 1)
        self.queued += 1

    def enter(self, wait: int) -> None:
        submit, self.queued = self.queued, 0
        if int(libc().syscall(SYS_IO_URING_ENTER, self.fd, submit, wait, ENTER_GETEVENTS if wait else 0,
                              None, 0)) < 0:
            raise OSError(ctypes.get_errno(), "io_uring_enter")

    def results(self) -> dict[int, int]:
        head, tail = (struct.unpack_from("=I", self.ring, self.cq[k])[0] for k in ("head", "tail"))
        out = {}
        while head != tail:
            at = self.cq["cqes"] + (head & self.cq_mask) * 16
            user_data, res = struct.unpack_from("=Qi", self.ring, at)
            out[user_data] = res
            head += 1
        struct.pack_into("=I", self.ring, self.cq["head"], head)
        return out


def sqe(opcode: int, fd: int, *, flags: int = 0, off: int = 0, addr: int = 0, length: int = 0,
        user_data: int = 0, optlen: int = 0, optval: int = 0) -> bytes:
    """struct io_uring_sqe (64 bytes): the fields the two requests here use."""
    return struct.pack("=BBHiQQIIQHHIQ8x", opcode, flags, 0, fd, off, addr, length, 0, user_data, 0, 0, optlen,
                       optval)


def flush_payload(sock: socket.socket, table: str) -> ctypes.Array[ctypes.c_char]:
    """The IPT_SO_SET_REPLACE argument that gives the IPv4 table of the socket's netns empty accepting
    built-in chains (with a NUL after it: its length is one less than the buffer's)."""
    info = ctypes.create_string_buffer(table.encode(), INFO.size)
    getsockopt_into(sock.fileno(), socket.IPPROTO_IP, SO_GET_INFO, info, f"table {table}")
    _, valid_hooks, *_, num_entries, _size = INFO.unpack_from(info.raw)
    blob = pristine(4, valid_hooks)
    old = ctypes.create_string_buffer(16 * num_entries)
    _OLD_COUNTERS.append(old)
    return ctypes.create_string_buffer(
        REPLACE.pack(table.encode(), valid_hooks, blob.num_entries, len(blob.entries), *blob.hook_entry,
                     *blob.underflow, num_entries, ctypes.addressof(old)) + blob.entries)


_OLD_COUNTERS: list[ctypes.Array[ctypes.c_char]] = []  # where the kernel writes the old counters: kept alive


def main(argv: list[str]) -> int:
    netns, table, after_stdin = argv[0], argv[1], "--after-stdin" in argv[2:]
    enter(netns)
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    payload = flush_payload(sock, table)
    ring = Ring()
    byte = ctypes.create_string_buffer(1)
    if after_stdin:
        ring.queue(sqe(OP_READ, 0, flags=SQE_IO_LINK, addr=ctypes.addressof(byte), length=1, user_data=1))
    ring.queue(sqe(OP_URING_CMD, sock.fileno(), off=SOCKET_URING_OP_SETSOCKOPT,
                   addr=socket.IPPROTO_IP | (SO_SET_REPLACE << 32), user_data=2, optlen=len(payload.raw) - 1,
                   optval=ctypes.addressof(payload)))
    ring.enter(0 if after_stdin else 1)
    if after_stdin:
        print("submitted", flush=True)
    results = ring.results()
    while 2 not in results:
        ring.enter(1)
        results.update(ring.results())
    print(results[2], flush=True)
    return 0 if results[2] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
