"""Golden-file comparison shared by the rule and the dry-run ADD golden tests."""

from __future__ import annotations

import os
from pathlib import Path


def assert_golden(path: Path, text: str) -> None:
    """`text` equals the golden file at `path`; `HEADRACE_UPDATE_GOLDEN=1` (re)writes it first."""
    if os.environ.get("HEADRACE_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing {path}; run with HEADRACE_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{path.stem} differs from {path} (HEADRACE_UPDATE_GOLDEN=1 regenerates)"
