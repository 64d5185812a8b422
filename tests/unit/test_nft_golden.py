"""Golden files of the nftables rule builder (the table as `nft list table` prints it), one per scenario.

Regenerate after an intended change with `HEADRACE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest
tests/unit/test_nft_golden.py` and review the diff. tests/kernel/test_nft_lifecycle.py loads every
scenario into a real netns and checks that nft prints exactly this text back.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.golden import assert_golden
from tests.unit.nft_scenarios import SCENARIOS

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "golden" / "nft"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_golden(name: str) -> None:
    assert_golden(GOLDEN_DIR / f"{name}.golden", SCENARIOS[name]().render())


def test_no_stale_golden_files() -> None:
    on_disk = {p.stem for p in GOLDEN_DIR.glob("*.golden")}
    assert on_disk <= set(SCENARIOS), f"golden files without a scenario: {sorted(on_disk - set(SCENARIOS))}"
