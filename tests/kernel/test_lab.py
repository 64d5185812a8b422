"""`headrace lab run` end to end: the whole product on the local kernel, exit 0 only if every step checked out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEADRACE = str(Path(sys.executable).parent / "headrace")


def test_lab_run_walks_every_step_and_leaves_nothing(tmp_path: Path) -> None:
    lab_dir = tmp_path / "lab"
    proc = subprocess.run(
        [HEADRACE, "lab", "run", "--dir", str(lab_dir)], capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "summary" in proc.stdout
    assert "FAILED" not in proc.stdout
    assert not lab_dir.exists()
