"""Which processes are connected to one of our listening unix sockets (used for the gRPC proxy socket,
whose accepted connections grpcio does not expose).

The kernel's sock_diag (NETLINK_SOCK_DIAG, AF_UNIX dump with UDIAG_SHOW_VFS | UDIAG_SHOW_PEER) lists every
connected unix socket of the caller's network namespace; the server ends of connections accepted on a
listening socket carry the socket file's inode (VFS attribute), and their PEER attribute is the inode of
the client's socket. The client's pid is then the process holding an fd `socket:[<peer inode>]` (a /proc
scan). Only sockets of the caller's netns are visible: a client in another netns is not found here (the
netns-fd side channel's SO_PEERCRED covers it).
"""

from __future__ import annotations

import os
import socket
import struct

from cni.netlink import netlink_parse
from cni.netlink.netlink_parse import NLMSG_DONE, NLMSG_ERROR

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
UDIAG_SHOW_VFS = 0x2
UDIAG_SHOW_PEER = 0x4
UNIX_DIAG_VFS = 1
UNIX_DIAG_PEER = 2
TCP_ESTABLISHED = 1

_REQ = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie[2]
_MSG = struct.Struct("=BBBBIII")  # family, type, state, pad, ino, cookie[2]


class UnixDiagError(OSError):
    """sock_diag refused the dump or answered something unexpected."""


def parse_dump(data: bytes) -> tuple[list[tuple[int, int | None, int | None]], bool]:
    """Messages of one netlink read: [(socket inode, vfs inode or None, peer inode or None)], and whether
    the dump is complete (NLMSG_DONE seen). Raises UnixDiagError on an NLMSG_ERROR."""
    out: list[tuple[int, int | None, int | None]] = []
    try:
        for mtype, _seq, body in netlink_parse.messages(data):
            if mtype == NLMSG_DONE:
                return out, True
            if mtype == NLMSG_ERROR:
                err = netlink_parse.error_code(body)
                if err:
                    raise UnixDiagError(err, f"sock_diag: {os.strerror(err)}")
                continue
            if mtype != SOCK_DIAG_BY_FAMILY or len(body) < _MSG.size:
                continue
            _fam, _typ, _state, _pad, ino, _c0, _c1 = _MSG.unpack_from(body)
            vfs: int | None = None
            peer: int | None = None
            for atype, payload in netlink_parse.attributes(body[_MSG.size :]):
                if atype == UNIX_DIAG_VFS and len(payload) >= 4:
                    vfs = struct.unpack_from("=I", payload)[0]
                elif atype == UNIX_DIAG_PEER and len(payload) >= 4:
                    peer = struct.unpack_from("=I", payload)[0]
            out.append((ino, vfs, peer))
    except netlink_parse.NetlinkParseError as exc:
        raise UnixDiagError(str(exc)) from None
    return out, False


def connected_peer_inodes(socket_file_inode: int) -> set[int]:
    """Inodes of the client sockets connected to the listening socket whose file has this inode."""
    peers: set[int] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(5.0)
        req = _REQ.pack(socket.AF_UNIX, 0, 0, 1 << TCP_ESTABLISHED, 0, UDIAG_SHOW_VFS | UDIAG_SHOW_PEER, 0xFFFFFFFF,
                        0xFFFFFFFF)
        nlmsghdr = netlink_parse.NLMSGHDR
        hdr = nlmsghdr.pack(nlmsghdr.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
        nl.sendall(hdr + req)
        done = False
        while not done:
            data = nl.recv(65536)
            if not data:
                break
            rows, done = parse_dump(data)
            for _ino, vfs, peer in rows:
                if vfs == socket_file_inode and peer:
                    peers.add(peer)
    return peers


def pids_holding_sockets(inodes: set[int], proc_root: str = "/proc") -> set[int]:
    """Pids (of the caller's pid namespace) with an open fd on one of these socket inodes."""
    wanted = {f"socket:[{ino}]" for ino in inodes}
    pids: set[int] = set()
    if not wanted:
        return pids
    me = os.getpid()
    for entry in os.scandir(proc_root):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        fd_dir = f"{proc_root}/{entry.name}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in names:
            try:
                if os.readlink(f"{fd_dir}/{fd}") in wanted:
                    pids.add(int(entry.name))
                    break
            except OSError:
                continue
    return pids


def client_pids(socket_path: str) -> set[int]:
    """Pids of the processes connected to the unix socket listening at socket_path (same netns only)."""
    ino = os.stat(socket_path).st_ino
    return pids_holding_sockets(connected_peer_inodes(ino))
