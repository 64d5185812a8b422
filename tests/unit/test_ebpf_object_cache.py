"""The on-disk compiled eBPF object: key, round trip, and refusals (pure + a private tmp dir)."""

from __future__ import annotations

import os

import pytest
from node_agent.backends.ebpf import loader
from node_agent.backends.ebpf import object_cache as oc
from node_agent.backends.ebpf.bpfsys import MapSpec

MAPS = {"hr_cfg": MapSpec(2, 4, 96, 1, 0), "hr_in_orig": MapSpec(24, 4, 20, 0, 1)}
INSNS = bytes(range(16)) * 2  # 4 instructions
RELOCS: tuple[tuple[int, str], ...] = ((0, "hr_cfg"), (2, "hr_in_orig"))
PROGS = {"hr_connect4": (18, 10, INSNS, RELOCS)}


def test_key_changes_with_any_input():
    base = oc.cache_key([b"c", b"h"], "6.18", "0.26.0")
    assert base == oc.cache_key([b"c", b"h"], "6.18", "0.26.0")
    others = {oc.cache_key([b"c2", b"h"], "6.18", "0.26.0"), oc.cache_key([b"c", b"h"], "6.19", "0.26.0"),
              oc.cache_key([b"c", b"h"], "6.18", "0.27.0"), oc.cache_key([b"ch"], "6.18", "0.26.0")}
    assert base not in others and len(others) == 4


def test_round_trip():
    raw = oc.encode("k1", PROGS, MAPS)
    progs, maps = oc.decode(raw, "k1", {"hr_connect4"}, set(MAPS))
    assert progs == PROGS and maps == MAPS


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda r: r.replace(b'"k1"', b'"k2"'), "key"),
        (lambda r: r[:-5], "JSON"),
        (lambda r: r.replace(b'"relocs":[[0,"hr_cfg"]', b'"relocs":[[9,"hr_cfg"]'), "outside"),
        (lambda r: r.replace(b'[2,"hr_in_orig"]', b'[2,"hr_evil"]'), "relocation"),
    ],
)
def test_bad_files_are_refused(mutate, why):
    raw = mutate(oc.encode("k1", PROGS, MAPS))
    with pytest.raises(oc.CacheError):
        oc.decode(raw, "k1", {"hr_connect4"}, set(MAPS))


def test_other_programs_or_maps_are_refused():
    raw = oc.encode("k1", PROGS, MAPS)
    with pytest.raises(oc.CacheError):
        oc.decode(raw, "k1", {"hr_connect4", "hr_connect6"}, set(MAPS))
    with pytest.raises(oc.CacheError):
        oc.decode(raw, "k1", {"hr_connect4"}, {"hr_cfg"})


def test_write_read_and_old_objects_removed(tmp_path):
    d = tmp_path / "cache"
    oc.write(d, "old", b"x")
    path = oc.write(d, "new", b"data")
    assert oc.read(d, "new") == b"data" and oc.read(d, "old") is None
    assert (os.stat(d).st_mode & 0o777) == 0o700 and (os.stat(path).st_mode & 0o777) == 0o600


def test_a_file_others_can_write_is_not_trusted(tmp_path):
    path = oc.write(tmp_path, "k", b"data")
    os.chmod(path, 0o666)
    with pytest.raises(oc.CacheError):
        oc.read(tmp_path, "k")
    path.unlink()
    os.symlink("/etc/hostname", path)
    with pytest.raises(oc.CacheError):
        oc.read(tmp_path, "k")


def test_what_the_loader_writes_it_reads_back(tmp_path):
    """Every compiled function (each mode's variant of the connect programs included) goes to the cache
    and comes back: a restarted agent loads the object instead of compiling it again."""
    names = loader.compiled_functions()
    assert {"hr_connect4_sc", "hr_connect4_amb", "hr_connect6_sc", "hr_connect6_amb"} <= set(names)
    assert "hr_connect4" not in names and names["hr_connect4_amb"] == loader.PROGRAMS["hr_connect4"]
    maps = dict.fromkeys((*loader.POD_MAPS, *loader.NODE_MAPS, *loader.WATCH_MAPS), MAPS["hr_cfg"])
    programs = {n: loader.Program(n, t, a, INSNS, RELOCS[:1]) for n, (t, a) in names.items()}
    obj = loader.CompiledObject(programs, maps)
    oc.write(tmp_path, "k1", loader.encode("k1", obj))
    assert loader._load_cached(tmp_path, "k1") == obj


def test_each_mode_loads_its_own_function():
    assert loader.function_of("hr_connect6", ambient=True) == "hr_connect6_amb"
    assert loader.function_of("hr_connect6", ambient=False) == "hr_connect6_sc"
    assert loader.function_of("hr_sockops", ambient=True) == "hr_sockops"
