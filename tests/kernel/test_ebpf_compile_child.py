"""The eBPF compile runs in a child process: the agent gets the object, never bcc or LLVM (~180 MiB it
would keep resident), and a source that does not compile is a ToolchainError with bcc's reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.ebpf]

if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)
pytest.importorskip("bcc")

from node_agent.backends.ebpf import loader  # noqa: E402

# a fresh interpreter (this one may have imported bcc already), no disk cache
AGENT = """
import json, sys
from node_agent.backends.ebpf import loader
try:
    obj = loader.compile_object()
    out = {"programs": sorted(obj.programs), "compiles": loader.compile_count}
except loader.ToolchainError as e:
    out = {"error": str(e)}
out["bcc_imported"] = "bcc" in sys.modules
print(json.dumps(out))
"""


def _agent(env: dict[str, str]) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **env)
    env.pop(loader.CACHE_ENV, None)
    res = subprocess.run([sys.executable, "-c", AGENT], capture_output=True, text=True, env=env, timeout=300,
                         check=True)  # fmt: skip
    out: dict[str, object] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def test_the_object_comes_from_a_child_and_bcc_stays_out_of_the_agent() -> None:
    got = _agent({})
    assert got == {"programs": sorted(loader.compiled_functions()), "compiles": 1, "bcc_imported": False}


def test_a_source_that_does_not_compile_is_a_toolchain_error(tmp_path: Path) -> None:
    src = tmp_path / "bpf"
    shutil.copytree(loader.bpf_source_dir(), src)
    with (src / loader.C_FILE).open("a") as f:
        f.write("\nint hr_broken(void) { return undeclared_thing; }\n")
    got = _agent({"HEADRACE_BPF_DIR": str(src)})
    assert "bcc failed to compile" in str(got.get("error")) and got["bcc_imported"] is False
