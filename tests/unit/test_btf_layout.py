"""`btf_layout`: member offsets from BTF bytes (a small BTF made here, and the running kernel's own when it
has one), and what makes it give up (None: the change count then counts every map write)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from node_agent.backends.ebpf import btf_layout
from node_agent.backends.ebpf.btf_layout import CHAIN, BtfError, parse


class Btf:
    """A little-endian BTF blob, type by type (ids from 1)."""

    def __init__(self) -> None:
        self.strings = b"\0"
        self.types = b""
        self.next_id = 1

    def name(self, text: str) -> int:
        if not text:
            return 0
        off = len(self.strings)
        self.strings += text.encode() + b"\0"
        return off

    def add(self, kind: int, name: str, vlen: int, size_or_type: int, extra: bytes = b"", kflag: int = 0) -> int:
        info = (kflag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.name(name), info, size_or_type) + extra
        self.next_id += 1
        return self.next_id - 1

    def int_(self, size: int) -> int:
        return self.add(1, f"u{size * 8}", 0, size, struct.pack("<I", size * 8))

    def ptr(self, to: int = 0) -> int:
        return self.add(2, "", 0, to)

    def array(self, elem: int, n: int, index: int) -> int:
        return self.add(3, "", 0, 0, struct.pack("<III", elem, index, n))

    def struct_(self, name: str, members: list[tuple[str, int, int]], kind: int = 4, kflag: int = 0) -> int:
        extra = b"".join(struct.pack("<III", self.name(m), t, off) for m, t, off in members)
        return self.add(kind, name, len(members), 64, extra, kflag)

    def blob(self) -> bytes:
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings))
        return hdr + self.types + self.strings


def kernel_like(map_name_bits: int = 8 * 136, private_in_union: bool = True) -> Btf:
    b = Btf()
    u8, u32, u64 = b.int_(1), b.int_(4), b.int_(8)
    ptr = b.ptr()
    const_u32 = b.add(10, "", 0, u32)  # const unsigned int
    b.struct_("task_struct", [("pid", u32, 0), ("files", ptr, 8 * 1824)])
    b.struct_("files_struct", [("count", u64, 0), ("fdt", ptr, 8 * 32)])
    b.struct_("fdtable", [("max_fds", const_u32, 0), ("fd", ptr, 64)])
    if private_in_union:  # an anonymous union inside an anonymous struct, as newer kernels lay `file` out
        union = b.struct_("", [("f_mode", u32, 0), ("private_data", ptr, 0)], kind=5)
        inner = b.struct_("", [("f_count", u64, 0), ("", union, 64)])
        b.struct_("file", [("f_lock", u32, 0), ("", inner, 128)])
    else:
        b.struct_("file", [("f_lock", u32, 0), ("private_data", ptr, 8 * 24)])
    name = b.array(u8, 16, u32)
    b.struct_("bpf_map", [("ops", ptr, 0), ("name", name, map_name_bits)], kflag=1)
    return b


def test_the_chain_is_read_through_modifiers_and_anonymous_members() -> None:
    assert parse(kernel_like().blob()) == (1824, 32, 0, 8, 24, 136)
    assert parse(kernel_like(private_in_union=False).blob()) == (1824, 32, 0, 8, 24, 136)


def test_a_member_missing_ambiguous_or_of_another_kind_gives_no_layout() -> None:
    b = kernel_like()
    b.struct_("fdtable", [("max_fds", 1, 0), ("fd", 4, 128)])  # a second fdtable, fd elsewhere
    assert parse(b.blob()) is None
    b = Btf()
    b.struct_("task_struct", [("files", b.int_(8), 0)])  # not a pointer
    assert parse(b.blob()) is None
    assert parse(kernel_like(map_name_bits=8 * 136 + 3).blob()) is None  # not on a byte boundary
    assert parse(Btf().blob()) is None  # no such structs at all
    b = Btf()  # bad BTF: a typedef naming itself, a struct holding itself as an anonymous member
    loop = b.add(8, "loop_t", 0, 1)
    b.struct_("task_struct", [("files", loop, 0), ("", loop + 1, 64)])
    assert parse(b.blob()) is None


NOT_BTF = [b"", b"\xeb\x9f" + bytes(30), struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, 999, 0, 0)]


@pytest.mark.parametrize("blob", NOT_BTF)
def test_bytes_that_are_not_btf_are_refused(blob: bytes) -> None:
    with pytest.raises(BtfError):
        parse(blob)


def test_a_cut_record_is_refused() -> None:
    b = kernel_like()
    good = b.blob()
    cut = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(b.types) - 5, len(b.types) - 5, len(b.strings))
    with pytest.raises(BtfError):
        parse(cut + good[24:])


def test_no_kernel_btf_file_is_no_layout(tmp_path: Path) -> None:
    assert btf_layout.read_offsets(tmp_path / "missing") is None
    (tmp_path / "junk").write_bytes(b"junk")
    assert btf_layout.read_offsets(tmp_path / "junk") is None
    (tmp_path / "empty").write_bytes(b"")  # cannot be mapped: read instead
    assert btf_layout.read_offsets(tmp_path / "empty") is None
    (tmp_path / "btf").write_bytes(kernel_like().blob())
    assert btf_layout.read_offsets(tmp_path / "btf") == (1824, 32, 0, 8, 24, 136)


@pytest.mark.skipif(not btf_layout.VMLINUX.exists(), reason="this kernel has no BTF")
def test_the_running_kernels_btf_has_the_chain() -> None:
    offsets = btf_layout.read_offsets()
    assert offsets is not None and len(offsets) == len(CHAIN)
    files, fdt, _max_fds, fd, private, name = offsets
    assert files > 0 and fdt > 0 and fd > 0 and private > 0 and name > 0  # none of them a struct's first member
