"""An agent watching many pods holds a socket or two per pod netns. libnftables waits with select() and
aborts the process when its own socket lands on a descriptor at or above FD_SETSIZE (1024), which is
where the lowest free one would be once the watch sockets took the low ones. The watch sockets are moved
above FD_SETSIZE, so libnftables keeps working with 1200 of them open. Run in a child process inside a
throwaway netns: an abort must not take the test run with it, and the sockets watch only that netns."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import sys
from node_agent.backends.nftables import libnft
from node_agent.kernel import fd_limit, nft_events

fd_limit.raise_fd_limit()
socks = [s for _ in range(600) for s in nft_events._open_here(True)]  # 600 watched pods
low = sum(1 for s in socks if s.fileno() < fd_limit.FD_SETSIZE)
results = libnft.run_in_netns(None, ["add table inet hrtest", "list table inet hrtest", "delete table inet hrtest"])
print(low, [r.rc for r in results])
"""


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"hr-fd-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=True)


def test_libnftables_works_beside_many_watch_sockets(netns: str) -> None:
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 4096:
        pytest.skip("the hard open-file limit leaves no room above FD_SETSIZE")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'node-agent'}:{ROOT}"}
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", CHILD],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "[0,", "0,", "0]"], out.stdout
