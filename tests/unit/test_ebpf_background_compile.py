"""The first start on a node compiles in the background: callers wait for the one compile, a failure is
kept and makes an `auto` backend decline pods (the agent's iptables fallback takes them), while a forced
`ebpf` backend fails them closed. The compile itself is stubbed (no bcc, no root)."""

from __future__ import annotations

import threading
import time

import pytest
from node_agent.backends.base import BackendError
from node_agent.backends.ebpf import loader
from node_agent.backends.ebpf.backend import EbpfBackend

from cni.contract.spec import SidecarSpec

OBJ = loader.CompiledObject(programs={}, maps={})


@pytest.fixture(autouse=True)
def fresh_loader(monkeypatch, tmp_path):
    monkeypatch.setattr(loader, "_cached", None)
    monkeypatch.setattr(loader, "_failure", None)
    monkeypatch.setattr(loader, "_busy", False)
    monkeypatch.setattr(loader, "compile_count", 0)
    monkeypatch.setattr(loader, "_cache_dir", None)
    monkeypatch.setenv(loader.CACHE_ENV, "")
    monkeypatch.setattr(loader, "cache_dir", lambda: None)


def test_callers_wait_for_the_one_background_compile(monkeypatch, tmp_path):
    release = threading.Event()
    calls: list[int] = []

    def slow_compile() -> loader.CompiledObject:
        calls.append(1)
        release.wait(5)
        return OBJ

    monkeypatch.setattr(loader, "_compile", slow_compile)
    loader.compile_in_background(lambda obj: None)
    got: list[loader.CompiledObject] = []
    waiter = threading.Thread(target=lambda: got.append(loader.compile_object()))
    waiter.start()
    time.sleep(0.1)
    assert not got  # still compiling: the caller waits
    # the backend never waits: `auto` hands pods to its fallback meanwhile, a forced one asks for a retry
    assert loader.busy()
    assert "being compiled" in (EbpfBackend(tmp_path / "a", toolchain_fallback=True).fallback_reason(SidecarSpec())
                                or "")
    with pytest.raises(BackendError, match=r"being compiled.*retry"):
        EbpfBackend(tmp_path / "b")._object()
    release.set()
    waiter.join(5)
    assert got == [OBJ] and calls == [1] and loader.failure() is None
    deadline = time.monotonic() + 5
    while loader.busy() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert EbpfBackend(tmp_path / "c")._object() is OBJ


def test_failed_compile_declines_pods_under_auto_and_fails_them_when_forced(monkeypatch, tmp_path):
    def broken() -> loader.CompiledObject:
        raise loader.ToolchainError("clang said no")

    monkeypatch.setattr(loader, "_compile", broken)
    loader.compile_in_background(lambda obj: None)
    with loader._lock:  # the background work is done once the lock is free again
        pass
    deadline = time.monotonic() + 5
    while (loader.busy() or loader.failure() is None) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "clang said no" in (loader.failure() or "")
    auto = EbpfBackend(tmp_path / "a", toolchain_fallback=True)
    assert "clang said no" in (auto.fallback_reason(SidecarSpec()) or "")
    forced = EbpfBackend(tmp_path / "b")
    assert forced.fallback_reason(SidecarSpec()) is None
    with pytest.raises(BackendError, match="clang said no"):
        forced._object()


def test_verifier_refusal_is_reported(monkeypatch):
    monkeypatch.setattr(loader, "_compile", lambda: OBJ)
    loader.compile_in_background(lambda obj: "the kernel refused the probe program")
    deadline = time.monotonic() + 5
    while loader.failure() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loader.failure() == "the kernel refused the probe program"
    assert loader.compile_object() is OBJ  # the object itself is there; loading it fails per pod


def test_missing_programs_decline_new_pods_only(monkeypatch, tmp_path):
    """Programs being compiled, or not compiling, concern only pods the backend does not hold yet (those it
    holds have theirs pinned); a reason of the spec's own concerns every pod."""
    from cni.contract.spec import AmbientSpec

    auto = EbpfBackend(tmp_path / "a", toolchain_fallback=True, proxy_cgroup=str(tmp_path))
    assert auto.fallback_reason(SidecarSpec()) is None and not auto.declines_new_pods_only(SidecarSpec())
    monkeypatch.setattr(loader, "_busy", True)
    assert auto.declines_new_pods_only(SidecarSpec()) and auto.declines_new_pods_only(AmbientSpec())
    monkeypatch.setattr(loader, "_busy", False)
    monkeypatch.setattr(loader, "_failure", "clang said no")
    assert auto.declines_new_pods_only(AmbientSpec())
    no_cgroup = EbpfBackend(tmp_path / "b", toolchain_fallback=True)
    assert no_cgroup.fallback_reason(AmbientSpec()) and not no_cgroup.declines_new_pods_only(AmbientSpec())
