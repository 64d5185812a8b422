"""Property-based fuzzing of the CNI plugin in-process (cni.plugin.entry.run, the executable's whole
path): stdin netconf, the CNI_* environment and the pod's labels and annotations. Hypothesis draws
450 structured inputs (derandomized); each is run as drawn and with 21 cheap mutations of it (a field
replaced or removed, bytes bent, an env variable changed; seeded from the example), 9 900 plugin runs in
all. Every command the kernel layer would start goes to a recording runner that answers success, and
the agent is a fake that answers at random (enrolled, retry, refusal, garbage, hang-up), so each case
costs about a millisecond. Invariant (tests/faults/plugin_checks.py): a CNI result or one CNI error
object, never an internal error or an exception. The kernel and subprocess runs are in
test_fuzz_plugin_kernel.py."""

from __future__ import annotations

import json
import os
import random
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni.kernel import spawn
from cni.plugin import entry
from cni.plugin.log import JsonLog
from tests.faults.plugin_checks import check_answer
from tests.faults.plugin_inputs import (
    FUZZ,
    environments,
    mutate_env,
    mutate_stdin,
    pod_objects,
    stdin_bytes,
    write_objects,
)
from tests.unit.test_cni_agent_client import FakeAgent

pytestmark = pytest.mark.faults

EXAMPLES = 450
MUTATIONS = 21  # per example, besides the example itself
IN_PROCESS_CASES = EXAMPLES * (1 + MUTATIONS)
AGENT_REPLIES = (
    b'{"ok": true, "state": "enrolled"}\n',
    b'{"ok": false, "error": "not yet", "retry": true}\n',
    b'{"ok": false, "error": "no", "retry": false}\n',
    b'{"ok": "yes"}\n',
    b"[1, 2]\n",
    b"\xff\xfe\n",
    b'{"ok": true, "state": ' + b"[" * 3000 + b"\n",
    None,
)


class PinnedLog(JsonLog):
    """The plugin's log, always written to one file of the test: fuzzed `log_file` values (bent bytes
    make any path of them) never create files elsewhere."""

    path_for_tests = "/dev/null"

    def __init__(self, path: str = "", level: str = "info", **context: str) -> None:
        super().__init__(self.path_for_tests, level, **context)

    def configure(self, path: str | None = None, level: str | None = None) -> None:
        super().configure(self.path_for_tests if path else None, level)


class Recorder:
    """Records each batch; every command succeeds with no output."""

    def __init__(self) -> None:
        self.batches = 0

    def run_many(self, jobs: Sequence[tuple[Sequence[str], str | None]], timeout: float) -> list[spawn.Result]:
        self.batches += 1
        return [spawn.Result(0, "", "") for _ in jobs]


class Stage:
    """A tmp dir with the objects dir, a pod netns, hostile netns paths, and a fake agent."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="hr-fuzz-"))
        (self.tmp / "objects").mkdir()
        (self.tmp / "regular").write_text("")
        argv = ["unshare", "--net", "sleep", "600"] if os.geteuid() == 0 else ["unshare", "-rn", "sleep", "600"]
        self.holder = subprocess.Popen(argv)
        self.pod_netns = f"/proc/{self.holder.pid}/ns/net"
        for _ in range(200):
            if os.path.exists(self.pod_netns) and os.stat(self.pod_netns).st_ino != os.stat("/proc/self/ns/net").st_ino:
                break
            time.sleep(0.01)
        self.reply_index = 0
        self.agent = FakeAgent(self.tmp / "agent.sock", self._reply)
        self.netns = {
            "pod": self.pod_netns, "pod2": self.pod_netns, "pod3": self.pod_netns,
            "own": "/proc/self/ns/net", "host": "/proc/1/ns/net", "regular": str(self.tmp / "regular"),
            "dir": str(self.tmp), "missing": str(self.tmp / "nope"), "empty": "", "relative": "netns/x",
            "uts": "/proc/self/ns/uts",
        }

    def _reply(self, req: dict[str, Any]) -> bytes | None:
        return AGENT_REPLIES[self.reply_index % len(AGENT_REPLIES)]

    def close(self) -> None:
        self.agent.close()
        self.holder.kill()
        self.holder.wait()
        subprocess.run(["rm", "-rf", str(self.tmp)], check=False)


@pytest.fixture(scope="module")
def stage() -> Iterator[Stage]:
    s = Stage()
    recorder = Recorder()
    previous = spawn.install_runner(recorder)
    PinnedLog.path_for_tests = str(s.tmp / "cni.log")
    pinned = pytest.MonkeyPatch()
    pinned.setattr(entry, "JsonLog", PinnedLog)
    try:
        yield s
    finally:
        pinned.undo()
        spawn.install_runner(previous)
        s.close()


class Tally:
    cases = 0
    by_code: dict[int, int] = {}  # a per-module counter, printed at the end


def test_fuzz_plugin_in_process(stage: Stage) -> None:
    paths = sorted(set(stage.netns.values()))

    def one(env: dict[str, str], stdin: bytes) -> None:
        status, text = entry.run(env, stdin)
        try:
            obj = check_answer(status, text, env.get("CNI_COMMAND"))
        except AssertionError as exc:
            raise AssertionError(f"env={env!r} stdin={stdin[:2000]!r}: {exc}") from exc
        Tally.cases += 1
        code = obj.get("code", 0) if obj and status == 1 else 0
        Tally.by_code[code] = Tally.by_code.get(code, 0) + 1

    @settings(FUZZ, max_examples=EXAMPLES)
    @given(data=st.data(), seed=st.integers(0, 2**32))
    def run_case(data: st.DataObject, seed: int) -> None:
        env = data.draw(environments(stage.netns))
        stdin = data.draw(stdin_bytes(stage.tmp))
        write_objects(stage.tmp / "objects", data.draw(pod_objects()))
        stage.reply_index = data.draw(st.integers(0, len(AGENT_REPLIES) - 1))
        one(env, stdin)
        rng = random.Random(seed)
        for _ in range(MUTATIONS):
            if rng.randrange(10) < 3:
                one(mutate_env(rng, env, paths), stdin)
            else:
                one(env, mutate_stdin(rng, stdin))

    run_case()
    print(f"\nplugin in-process: {Tally.cases} cases, exit codes {json.dumps(dict(sorted(Tally.by_code.items())))}")
    assert Tally.cases >= IN_PROCESS_CASES * 0.95
