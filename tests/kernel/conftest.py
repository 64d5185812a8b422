"""Fixtures of the kernel tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.bare_netns import bare_netns
from tests.harness.netns import NetNS


@pytest.fixture
def two() -> Iterator[tuple[str, str]]:
    """Two new bare netns (by name), deleted afterwards."""
    with bare_netns(2) as (first, second):
        yield first, second


@pytest.fixture
def ns() -> Iterator[NetNS]:
    """A new netns (only `lo`, down), deleted afterwards."""
    n = NetNS.create("hrns-")
    try:
        yield n
    finally:
        n.delete()
