"""What every headrace-cni invocation must answer, whatever its input: exit 0 with the result (or
nothing), or exit 1 with exactly one CNI error object; never an internal error (code 199: an input that
reached code which did not expect it) and never a traceback."""

from __future__ import annotations

import json
from typing import Any

KNOWN_CODES = {1, 2, 3, 4, 5, 6, 7, 11, 50, 100, 101, 102, 103, 104, 105, 106}


def check_answer(status: int, text: str, command: str | None) -> dict[str, Any] | None:
    """Assert the invariants; the parsed stdout object (None when stdout is empty)."""
    assert status in (0, 1), (status, text)
    if not text.strip():
        assert status == 0 and command not in ("ADD", "VERSION"), (status, text, command)
        return None
    assert text.endswith("\n") and text.count("\n") == 1, f"stdout must be one JSON line: {text!r}"
    obj = json.loads(text)
    assert isinstance(obj, dict), obj
    if status == 1:
        assert isinstance(obj.get("code"), int) and obj["code"] in KNOWN_CODES, obj
        assert isinstance(obj.get("msg"), str) and obj["msg"], obj
        assert isinstance(obj.get("cniVersion"), str), obj
    elif command == "ADD":
        assert isinstance(obj.get("cniVersion"), str), obj
    return obj
