"""Whether a tool is installed: an executable on PATH, looked up as `shutil.which` does without importing
`shutil` (nor anything else: the CNI plugin asks on its ADD and DEL paths)."""

from __future__ import annotations

import os


def on_path(name: str) -> bool:
    """Whether an executable `name` is on PATH."""
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(folder or ".", name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return True
    return False
