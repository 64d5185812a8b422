"""Bare network namespaces for kernel tests that only write and read rules (no interfaces, no pods)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager


def make_netns(prefix: str = "hrbn") -> str:
    """A new named netns (`ip netns add`); the caller deletes it."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    return name


@contextmanager
def bare_netns(count: int, prefix: str = "hrbn") -> Iterator[list[str]]:
    """`count` new netns for the block, deleted afterwards (also on failure)."""
    names: list[str] = []
    try:
        for _ in range(count):
            names.append(make_netns(prefix))
        yield names
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)


def ambient_routing(name: str) -> list[str]:
    """The ambient policy routing's rule (pref 32764) and route (table 100) in netns `name`, both families
    ([]: none)."""
    out: list[str] = []
    for fam in ("-4", "-6"):
        for what in (["rule", "list", "pref", "32764"], ["route", "list", "table", "100"]):
            got = subprocess.run(["ip", "-n", name, fam, *what], capture_output=True, text=True, check=False)
            out += got.stdout.splitlines()
    return [line for line in out if line]
