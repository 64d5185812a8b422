"""The bpf(2) commands the eBPF backend needs, through ctypes (no libbpf binding required).

Only what is used: map create/update/lookup/delete, program load, pin/get, cgroup attach/detach/query, fd by
id and object info. Every failure raises BpfSysError carrying errno and, for program loads, the verifier log.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import struct
import threading
from dataclasses import dataclass

from cni.kernel.netns import libc

SYS_BPF = 321  # x86_64
ATTR_SIZE = 160

MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
PROG_LOAD = 5
OBJ_PIN = 6
OBJ_GET = 7
PROG_ATTACH = 8
PROG_DETACH = 9
PROG_GET_FD_BY_ID = 13
MAP_GET_FD_BY_ID = 14
OBJ_GET_INFO_BY_FD = 15
PROG_QUERY = 16
BTF_LOAD = 18
LINK_GET_FD_BY_ID = 30
LINK_DETACH = 34

MAP_TYPE_SK_STORAGE = 24

F_ALLOW_MULTI = 2
F_REPLACE = 4
F_QUERY_EFFECTIVE = 1  # query: the programs that run for the cgroup (its own and its ancestors')

PROG_TYPE_SCHED_CLS = 3
PROG_TYPE_TRACEPOINT = 5
PROG_TYPE_CGROUP_SOCK = 9
PROG_TYPE_SOCK_OPS = 13
PROG_TYPE_CGROUP_SOCK_ADDR = 18
PROG_TYPE_CGROUP_SOCKOPT = 25

ATTACH_CGROUP_INET_SOCK_CREATE = 2
ATTACH_CGROUP_SOCK_OPS = 3
ATTACH_CGROUP_INET4_CONNECT = 10
ATTACH_CGROUP_INET6_CONNECT = 11
ATTACH_CGROUP_UDP4_SENDMSG = 14
ATTACH_CGROUP_UDP6_SENDMSG = 15
ATTACH_CGROUP_UDP4_RECVMSG = 19
ATTACH_CGROUP_UDP6_RECVMSG = 20
ATTACH_CGROUP_GETSOCKOPT = 21
ATTACH_CGROUP_INET4_GETPEERNAME = 29
ATTACH_CGROUP_INET6_GETPEERNAME = 30
ATTACH_TCX_INGRESS = 46  # tcx: run before the clsact filters of the interface
ATTACH_TCX_EGRESS = 47

_libc = libc()  # the process-wide handle (cni.kernel.netns)
_libc.syscall.restype = ctypes.c_long


class BpfSysError(OSError):
    """A bpf(2) command failed; .log holds the verifier log of a failed program load."""

    def __init__(self, err: int, what: str, log: str = "") -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.log = log


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    ret = _libc.syscall(SYS_BPF, cmd, attr, ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfSysError(err, what)
    return int(ret)


def _attr(fmt: str, *values: object) -> ctypes.Array[ctypes.c_char]:
    data = struct.pack(fmt, *values)
    buf = ctypes.create_string_buffer(ATTR_SIZE)
    ctypes.memmove(buf, data, len(data))
    return buf


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


@dataclass(frozen=True)
class MapSpec:
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


def storage_btf(value_size: int) -> bytes:
    """Pure: the smallest BTF a socket-storage map accepts (the kernel insists on key and value types):
    type 1 `int` (the key), type 2 `u8`, type 3 `u8[value_size]` (the value)."""
    strings = b"\0int\0u8\0"
    types = b"".join(
        (
            struct.pack("=IIII", 1, 1 << 24, 4, (1 << 24) | 32),  # INT "int": 4 bytes, signed, 32 bits
            struct.pack("=IIII", 5, 1 << 24, 1, 8),  # INT "u8": 1 byte, 8 bits
            struct.pack("=IIIIII", 0, 3 << 24, 0, 2, 1, value_size),  # ARRAY of type 2, index type 1
        )
    )
    header = struct.pack("=HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


def btf_load(blob: bytes) -> int:
    bb = ctypes.create_string_buffer(blob, len(blob))
    return _bpf(BTF_LOAD, _attr("=QQIII", _addr(bb), 0, len(blob), 0, 0), "load BTF")


def map_create(spec: MapSpec, name: str) -> int:
    raw = name.encode()[:15].ljust(16, b"\0")
    btf_fd, key_type, value_type = 0, 0, 0
    if spec.map_type == MAP_TYPE_SK_STORAGE:  # needs BTF for its key and value
        btf_fd, key_type, value_type = btf_load(storage_btf(spec.value_size)), 1, 3
    try:
        attr = _attr(
            "=IIIIIII16sIIII",
            spec.map_type, spec.key_size, spec.value_size, spec.max_entries, spec.flags, 0, 0, raw,
            0, btf_fd, key_type, value_type,
        )  # fmt: skip
        return _bpf(MAP_CREATE, attr, f"create map {name}")
    finally:
        if btf_fd:
            os.close(btf_fd)


def map_update(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    kb = ctypes.create_string_buffer(key, len(key))
    vb = ctypes.create_string_buffer(value, len(value))
    _bpf(MAP_UPDATE_ELEM, _attr("=I4xQQQ", fd, _addr(kb), _addr(vb), flags), "map update")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    kb = ctypes.create_string_buffer(key, len(key))
    vb = ctypes.create_string_buffer(value_size)
    try:
        _bpf(MAP_LOOKUP_ELEM, _attr("=I4xQQQ", fd, _addr(kb), _addr(vb), 0), "map lookup")
    except BpfSysError as e:
        if e.errno == errno_mod.ENOENT:
            return None
        raise
    return vb.raw[:value_size]


def map_keys(fd: int, key_size: int, limit: int = 65536) -> list[bytes]:
    """Every key of a map (BPF_MAP_GET_NEXT_KEY from the first), at most `limit`."""
    out: list[bytes] = []
    prev: ctypes.Array[ctypes.c_char] | None = None
    while len(out) < limit:
        nxt = ctypes.create_string_buffer(key_size)
        try:
            _bpf(MAP_GET_NEXT_KEY, _attr("=I4xQQ", fd, _addr(prev), _addr(nxt)), "map next key")
        except BpfSysError as e:
            if e.errno == errno_mod.ENOENT:
                break
            raise
        out.append(nxt.raw)
        prev = nxt
    return out


def map_delete(fd: int, key: bytes) -> None:
    kb = ctypes.create_string_buffer(key, len(key))
    try:
        _bpf(MAP_DELETE_ELEM, _attr("=I4xQQQ", fd, _addr(kb), 0, 0), "map delete")
    except BpfSysError as e:
        if e.errno != errno_mod.ENOENT:
            raise


def prog_load(prog_type: int, insns: bytes, name: str, expected_attach_type: int, license_: str = "GPL") -> int:
    ib = ctypes.create_string_buffer(insns, len(insns))
    lb = ctypes.create_string_buffer(license_.encode())
    raw = name.encode()[:15].ljust(16, b"\0")

    def attempt(log: ctypes.Array[ctypes.c_char] | None) -> int:
        size = len(log) if log is not None else 0
        attr = _attr(
            "=IIQQIIQII16sII",
            prog_type, len(insns) // 8, _addr(ib), _addr(lb),
            1 if log is not None else 0, size, _addr(log),
            0, 0, raw, 0, expected_attach_type,
        )  # fmt: skip
        return _bpf(PROG_LOAD, attr, f"load program {name}")

    try:
        return attempt(None)
    except BpfSysError as first:
        log = ctypes.create_string_buffer(1 << 20)
        try:
            return attempt(log)
        except BpfSysError as second:
            text = log.value.decode(errors="replace")
            raise BpfSysError(second.errno or first.errno or errno_mod.EINVAL, f"load program {name}", text) from None


def obj_pin(fd: int, path: str) -> None:
    pb = ctypes.create_string_buffer(path.encode())
    _bpf(OBJ_PIN, _attr("=QII", _addr(pb), fd, 0), f"pin {path}")


def obj_get(path: str) -> int:
    pb = ctypes.create_string_buffer(path.encode())
    return _bpf(OBJ_GET, _attr("=QII", _addr(pb), 0, 0), f"open pinned {path}")


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int, replace_fd: int = 0) -> None:
    attr = _attr("=IIIII", target_fd, prog_fd, attach_type, flags, replace_fd)
    _bpf(PROG_ATTACH, attr, "attach program")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    _bpf(PROG_DETACH, _attr("=IIII", target_fd, prog_fd, attach_type, 0), "detach program")


_QUERY_CAP = 64
_query_bufs = threading.local()  # per thread: the attr and id buffers of prog_query, made once


def prog_query(target_fd: int, attach_type: int, flags: int = 0) -> list[int]:
    """Ids of the programs attached to a cgroup for one attach type (flags 0: this cgroup only;
    F_QUERY_EFFECTIVE: the ones that run for it, in run order). The drift check asks each pod's cgroup at
    every hook every interval: the buffers are the thread's own, made once."""
    bufs = getattr(_query_bufs, "bufs", None)
    if bufs is None:
        bufs = _query_bufs.bufs = (ctypes.create_string_buffer(ATTR_SIZE), (ctypes.c_uint32 * _QUERY_CAP)())
    attr, ids = bufs
    ctypes.memset(attr, 0, ATTR_SIZE)
    struct.pack_into("=IIIIQI", attr, 0, target_fd, attach_type, flags, 0, ctypes.addressof(ids), _QUERY_CAP)
    _bpf(PROG_QUERY, attr, "query cgroup programs")
    count = struct.unpack_from("=I", attr, 24)[0]
    return ids[:min(count, _QUERY_CAP)]


def tcx_query(ifindex: int, attach_type: int) -> list[tuple[int, int]]:
    """(program id, link id or 0) of the tcx programs on an interface of the calling thread's netns."""
    cap = 64
    ids = (ctypes.c_uint32 * cap)()
    links = (ctypes.c_uint32 * cap)()
    attr = _attr("=IIIIQIIQQ", ifindex, attach_type, 0, 0, ctypes.addressof(ids), cap, 0, 0,
                 ctypes.addressof(links))
    _bpf(PROG_QUERY, attr, "query tcx programs")
    count = struct.unpack_from("=I", attr.raw, 24)[0]
    return [(int(ids[i]), int(links[i])) for i in range(min(count, cap))]


def tcx_detach(ifindex: int, attach_type: int, prog_id: int, link_id: int) -> None:
    """Take one tcx program off an interface: its link detached, or (attached without a link) the program."""
    if link_id:
        fd = _bpf(LINK_GET_FD_BY_ID, _attr("=III", link_id, 0, 0), f"open link id {link_id}")
        try:
            _bpf(LINK_DETACH, _attr("=I", fd), f"detach link id {link_id}")
        finally:
            os.close(fd)
        return
    fd = prog_fd_by_id(prog_id)
    try:
        prog_detach(fd, ifindex, attach_type)
    finally:
        os.close(fd)


def prog_fd_by_id(prog_id: int) -> int:
    return _bpf(PROG_GET_FD_BY_ID, _attr("=III", prog_id, 0, 0), f"open program id {prog_id}")


def map_fd_by_id(map_id: int) -> int:
    return _bpf(MAP_GET_FD_BY_ID, _attr("=III", map_id, 0, 0), f"open map id {map_id}")


@dataclass(frozen=True)
class ProgInfo:
    prog_type: int
    prog_id: int
    name: str
    map_ids: tuple[int, ...]


@dataclass(frozen=True)
class MapInfo:
    spec: MapSpec
    map_id: int
    name: str


def prog_info(fd: int) -> ProgInfo:
    info = ctypes.create_string_buffer(256)
    ids = (ctypes.c_uint32 * 64)()
    struct.pack_into("=I", info, 52, 64)  # nr_map_ids
    struct.pack_into("=Q", info, 56, ctypes.addressof(ids))
    _bpf(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, 256, ctypes.addressof(info)), "program info")
    ptype, pid = struct.unpack_from("=II", info.raw, 0)
    nr = struct.unpack_from("=I", info.raw, 52)[0]
    name = info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    return ProgInfo(ptype, pid, name, tuple(int(ids[i]) for i in range(min(nr, 64))))


def map_info(fd: int) -> MapInfo:
    info = ctypes.create_string_buffer(256)
    _bpf(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, 256, ctypes.addressof(info)), "map info")
    mtype, mid, ks, vs, me, fl = struct.unpack_from("=IIIIII", info.raw, 0)
    name = info.raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
    return MapInfo(MapSpec(mtype, ks, vs, me, fl), mid, name)
