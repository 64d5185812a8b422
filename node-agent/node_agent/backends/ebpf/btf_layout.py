"""Where the kernel keeps what the change count needs to tell a map write on our maps from one on somebody
else's: the byte offsets of a few struct members, read from the running kernel's own BTF
(`/sys/kernel/btf/vmlinux`), not from headers (the installed headers may be of another kernel build).

The chain the tracepoint program follows from the writing task to the map's name: `task_struct.files` →
`files_struct.fdt` → `fdtable.max_fds` and `fdtable.fd` → `file.private_data` (a map file's `bpf_map`) →
`bpf_map.name`. `parse` is pure (BTF bytes in, offsets out); every member is checked to be what the program
reads it as (a pointer, a 4-byte integer, a char array), and a member found twice at different offsets, or
not found, is no layout: the count then counts every map write, as it did before it could tell them apart.
"""

from __future__ import annotations

import mmap
import struct
from array import array
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")
MAGIC = 0xEB9F

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION = 1, 2, 3, 4, 5
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG = 8, 9, 10, 11, 18
_MODIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)
# bytes after the 12-byte type record: (fixed, per vlen item) by kind
_EXTRA = {1: (4, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 13: (0, 8), 14: (4, 0), 15: (0, 12),
          17: (4, 0), 19: (0, 12)}

POINTER, U32, CHARS = "pointer", "u32", "chars"
# (struct, member, what the program reads there)
CHAIN: tuple[tuple[str, str, str], ...] = (
    ("task_struct", "files", POINTER),
    ("files_struct", "fdt", POINTER),
    ("fdtable", "max_fds", U32),
    ("fdtable", "fd", POINTER),
    ("file", "private_data", POINTER),
    ("bpf_map", "name", CHARS),
)


class BtfError(ValueError):
    """Not BTF this code can read."""


class _Index:
    """The type records of a BTF blob, found by type id through one array of record offsets: no Python
    object per type (the kernel's BTF has over 100 000; objects for each would leave the agent's heap
    megabytes larger after the one read)."""

    def __init__(self, blob: bytes | mmap.mmap) -> None:
        if len(blob) < 24:
            raise BtfError("too short for a BTF header")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", blob, 0)
        if magic != MAGIC:
            raise BtfError("not BTF (bad magic; or not little-endian)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", blob, 8)
        types_at, self._strings_at = hdr_len + type_off, hdr_len + str_off
        if types_at + type_len > len(blob) or self._strings_at + str_len > len(blob):
            raise BtfError("sections beyond the end of the BTF")
        self.blob, self._strings_end = blob, self._strings_at + str_len
        self.records = array("I", [0])  # by type id: where its record starts (0: void)
        pos, end = types_at, types_at + type_len
        while pos < end:
            if pos + 12 > end:
                raise BtfError("a type record cut short")
            info = struct.unpack_from("<I", blob, pos + 4)[0]
            fixed, per = _EXTRA.get((info >> 24) & 0x1F, (0, 0))
            self.records.append(pos)
            pos += 12 + fixed + per * (info & 0xFFFF)
            if pos > end:
                raise BtfError("a type record cut short")

    def __len__(self) -> int:
        return len(self.records)

    def record(self, type_id: int) -> tuple[int, int, int, int]:
        """(name offset, kind, vlen and kflag as info, size or referred type) of a type."""
        name_off, info, size_or_type = struct.unpack_from("<III", self.blob, self.records[type_id])
        return name_off, (info >> 24) & 0x1F, info, size_or_type

    def kind(self, type_id: int) -> int:
        return self.record(type_id)[1]

    def named(self, type_id: int, name: str) -> bool:
        return self.name_is(self.record(type_id)[0], name)

    def name_is(self, name_off: int, name: str) -> bool:
        """Whether the string at `name_off` is `name` (compared in place: no string made per type)."""
        raw = name.encode() + b"\0"
        at = self._strings_at + name_off
        return at + len(raw) <= self._strings_end and self.blob[at:at + len(raw)] == raw

    def members(self, type_id: int) -> list[tuple[int, int, int]]:
        """A struct's or union's members: (name offset, type id, bit offset)."""
        _, _, info, _ = self.record(type_id)
        body, kflag = self.records[type_id] + 12, info >> 31
        out = []
        for i in range(info & 0xFFFF):
            name_off, member_type, bits = struct.unpack_from("<III", self.blob, body + 12 * i)
            out.append((name_off, member_type, bits & 0xFFFFFF if kflag else bits))
        return out

    def resolve(self, type_id: int) -> int | None:
        """The type behind typedefs and qualifiers (None: no such type, or a loop in bad BTF)."""
        for _ in range(32):
            if not 0 < type_id < len(self.records):
                return None
            _, kind, _, referred = self.record(type_id)
            if kind not in _MODIFIERS:
                return type_id
            type_id = referred
        return None

    def size(self, type_id: int) -> int:
        return self.record(type_id)[3]

    def array(self, type_id: int) -> tuple[int, int]:
        """An array type's (element type, element count)."""
        elem, _index, nelems = struct.unpack_from("<III", self.blob, self.records[type_id] + 12)
        return elem, nelems


def parse(blob: bytes | mmap.mmap, chain: tuple[tuple[str, str, str], ...] = CHAIN) -> tuple[int, ...] | None:
    """The byte offset of each (struct, member) of `chain`, in order; None when one is missing, ambiguous
    or not of the kind the program reads. Raises BtfError on bytes that are not BTF."""
    index = _Index(blob)
    structs = [i for i in range(1, len(index)) if index.kind(i) == KIND_STRUCT]
    out = []
    for struct_name, member, kind in chain:
        found = {off for t in structs if index.named(t, struct_name) for off in _member(index, t, member, kind, 0)}
        if len(found) != 1:
            return None
        out.append(found.pop())
    return tuple(out)


def read_offsets(path: Path | None = None) -> tuple[int, ...] | None:
    """The chain's offsets in the running kernel (None: no kernel BTF, unreadable, or not as expected)."""
    try:
        with open(path or VMLINUX, "rb") as fh:
            try:
                blob = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # sysfs files cannot always be mapped: read instead
                return parse(fh.read())
            with blob:
                return parse(blob)
    except (OSError, BtfError):
        return None


def _member(index: _Index, type_id: int, name: str, kind: str, base: int, depth: int = 0) -> list[int]:
    """Byte offsets of member `name` of struct/union `type_id`, looking into its anonymous members too."""
    found: list[int] = []
    if depth > 8:
        return found
    for name_off, member_type, bits in index.members(type_id):
        if bits % 8:
            continue
        if name_off and index.name_is(name_off, name):
            if _is(index, member_type, kind):
                found.append(base + bits // 8)
        elif not name_off:
            inner = index.resolve(member_type)
            if inner is not None and index.kind(inner) in (KIND_STRUCT, KIND_UNION):
                found += _member(index, inner, name, kind, base + bits // 8, depth + 1)
    return found


def _is(index: _Index, type_id: int, kind: str) -> bool:
    t = index.resolve(type_id)
    if t is None:
        return False
    if kind == POINTER:
        return index.kind(t) == KIND_PTR
    if kind == U32:
        return index.kind(t) == KIND_INT and index.size(t) == 4
    if index.kind(t) != KIND_ARRAY:
        return False
    elem, nelems = index.array(t)
    e = index.resolve(elem)
    return e is not None and index.kind(e) == KIND_INT and index.size(e) == 1 and nelems >= 3
