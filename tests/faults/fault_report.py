"""Per fault class: rounds run and invariant violations, collected by the fault tests.

Each test calls `record(...)`; the lines go to `$HEADRACE_FAULTS_REPORT` (JSON lines; default
/tmp/headrace-faults.jsonl) and to stdout (`pytest -s` or `-rA` shows them). `table()` renders the file as
the markdown table the README carries: `python -m tests.faults.fault_report [FILE]`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

DEFAULT = "/tmp/headrace-faults.jsonl"


def report_path() -> Path:
    return Path(os.environ.get("HEADRACE_FAULTS_REPORT", DEFAULT))


def record(fault_class: str, rounds: int, violations: int, detail: str = "") -> None:
    line = {"class": fault_class, "rounds": rounds, "violations": violations, "detail": detail, "ts": time.time()}
    with report_path().open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(line, sort_keys=True) + "\n")
    print(f"fault class {fault_class}: {rounds} rounds, {violations} invariant violations {detail}".rstrip())


def table(path: Path) -> str:
    rows: dict[str, list[int]] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(raw)
        except ValueError:
            continue
        acc = rows.setdefault(str(item["class"]), [0, 0])
        acc[0] += int(item["rounds"])
        acc[1] += int(item["violations"])
    out = ["| fault class | rounds run | invariant violations |", "|---|---:|---:|"]
    out += [f"| {name} | {r} | {v} |" for name, (r, v) in sorted(rows.items())]
    return "\n".join(out)


if __name__ == "__main__":
    print(table(Path(sys.argv[1]) if len(sys.argv) > 1 else report_path()))
