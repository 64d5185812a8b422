"""scripts/setup.sh fails early with a message naming what is missing (the bare-box image test runs it
for real on a fresh Debian)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_setup(tmp_path: Path, tools: list[str]) -> subprocess.CompletedProcess[str]:
    """setup.sh in a copy of the repo layout, with a PATH holding only `tools` (plus bash's builtins)."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        found = shutil.which(tool)
        assert found, tool
        os.symlink(found, bin_dir / tool)
    return subprocess.run(["/bin/bash", str(tmp_path / "scripts" / "setup.sh")], capture_output=True, text=True,
                          env={"PATH": str(bin_dir)}, timeout=60, check=False)


def test_no_apt_names_the_missing_packages(tmp_path: Path) -> None:
    proc = run_setup(tmp_path, ["dirname", "grep"])
    assert proc.returncode == 1
    assert "setup: ERROR: apt-get/dpkg not found: this set-up needs Debian 12 (bookworm)" in proc.stderr
    assert "iptables" in proc.stderr and "gcc" in proc.stderr and "python3-bpfcc" in proc.stderr
    assert proc.stdout == ""
