"""Fixtures of the kernel tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.bare_netns import bare_netns


@pytest.fixture
def two() -> Iterator[tuple[str, str]]:
    """Two new bare netns (by name), deleted afterwards."""
    with bare_netns(2) as (first, second):
        yield first, second
