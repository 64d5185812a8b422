"""The headrace-cni launcher of a simulated node or a bench (`write_plugin_launcher`): what install-cni
lays on a node, on this machine's interpreter and source tree instead of a bundled runtime."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path


def write_plugin_launcher(path: Path, agent_socket: str | None = None, front: bool = False) -> None:
    """Write a headrace-cni launcher the way install-cni lays one on a node: `python -IS` (no site
    processing, no editable-install hooks), the `cni` package first on sys.path, site-packages last
    (only for the lazily imported PyYAML); it relays ADDs to `agent_socket` first (default: the
    default configuration's). front: the `#!` line names the compiled front (`make front`) instead, as
    install-cni's does when the image has it; the front finds the interpreter as `python3` beside it,
    so both are linked into `.<name>-front/` next to the launcher."""
    import sysconfig

    import cni
    from cni.plugin.launch import DEFAULT_AGENT_SOCKET
    from node_agent.install_cni.runtime import FRONT_BINARY, FRONT_INTERPRETER, front_binary

    package_root = str(Path(cni.__file__).resolve().parent.parent)
    purelib = sysconfig.get_paths()["purelib"]
    shebang = f"#!{sys.executable} -IS"
    if front:
        binary = front_binary()
        if not binary:
            raise FileNotFoundError("the compiled front is not built: run `make front`")
        front_dir = path.parent / f".{path.name}-front"
        front_dir.mkdir(exist_ok=True)
        for name, target in ((FRONT_BINARY, binary), (FRONT_INTERPRETER, sys.executable)):
            with contextlib.suppress(FileNotFoundError):
                (front_dir / name).unlink()
            (front_dir / name).symlink_to(target)
        shebang = f"#!{front_dir / FRONT_BINARY} {agent_socket or DEFAULT_AGENT_SOCKET}"
    text = (
        f"{shebang}\n"
        "import sys\n"
        f"sys.path.insert(0, {package_root!r})\n"
        f"sys.path.append({purelib!r})\n"
        "from cni.plugin.launch import run_executable\n"
        + (f"run_executable({agent_socket!r})\n" if agent_socket else "run_executable()\n")
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, path)
