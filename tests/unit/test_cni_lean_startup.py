"""The stdlib replacements that keep the plugin's start-up lean behave exactly like what they replace:
cni.contract.jsoncodec vs json, cni_result.ip_version vs ipaddress, the netconf/annotations name checks vs the
regular expressions they implement, the spawner vs subprocess. Inputs: hand-picked edge cases plus a
seeded random fuzz."""

from __future__ import annotations

import ipaddress
import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cni.contract import annotations as cni_annotations
from cni.contract import jsoncodec
from cni.kernel import spawn
from cni.plugin import names
from cni.plugin import result as cni_result
from cni.rules import saved

REPO = str(Path(__file__).resolve().parents[2])

DOCS = [
    "{}",
    "[]",
    '  {"a": [1, 2.5, -3e10, true, false, null, "x\\u00e9\\n\\"q"]}  \n',
    '"just a string"',
    "12345678901234567890123456789",
    "-0.0",
    "1E400",
    "NaN",
    "-Infinity",
    '{"k": {"k": {"k": [[[[]]]]}}, "k2": "\\ud83d\\ude00"}',
    '{"dup": 1, "dup": 2}',
    "\t\r\n 7 \t\r\n",
]
BAD = ["", " ", "{", "[1,]", "1 2", "\ufeff{}", '{"a":1}x', "nan", '"\x01"', "{'a': 1}", "[" * 100000, "\x0b1"]


def _outcome(fn: Any, arg: Any) -> tuple[str, Any]:
    try:
        value = fn(arg)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "ok", json.dumps(value, sort_keys=True) if not isinstance(value, float) else repr(value)


@pytest.mark.parametrize("text", DOCS + BAD)
def test_loads_is_json_loads(text: str) -> None:
    assert _outcome(jsoncodec.loads, text) == _outcome(json.loads, text)


@pytest.mark.parametrize(
    "data", [d.encode() for d in DOCS + BAD] + ['{"a": 1}'.encode("utf-16"), b'\xef\xbb\xbf{"a": 1}', b"\xff{"]
)
def test_loads_bytes_is_json_loads(data: bytes) -> None:
    assert _outcome(jsoncodec.loads_bytes, data) == _outcome(json.loads, data)


OBJECTS: list[Any] = [
    {"a": [1, 2.5, -3e10, True, False, None, 'x\u00e9\n"q\U0001f600']},
    "plain",
    3,
    1.5,
    math.inf,
    [],
    {1: "int key", None: "none key", 2.5: "float key", False: "bool key"},
    ({"t": (1, 2)},),
]


@pytest.mark.parametrize("obj", OBJECTS)
@pytest.mark.parametrize("kwargs", [{}, {"separators": (",", ":"), "default": str}])
def test_dumps_is_json_dumps(obj: Any, kwargs: dict[str, Any]) -> None:
    assert jsoncodec.dumps(obj, **kwargs) == json.dumps(obj, **kwargs)


def test_dumps_errors_are_json_errors() -> None:
    circular: list[Any] = []
    circular.append(circular)
    for obj in ({1, 2}, circular, {"x": object()}, {(1, 2): 3}):
        assert _outcome(jsoncodec.dumps, obj) == _outcome(json.dumps, obj)
    assert jsoncodec.dumps({"x": {1, 2}}, default=str) == json.dumps({"x": {1, 2}}, default=str)


def test_what_the_text_gets_wrong_is_a_value_error() -> None:
    for text in ("{", '{"x": ' + "1" * 5000 + "}", "\ud800"):
        with pytest.raises(ValueError):
            jsoncodec.loads(text)


def test_success_paths_do_not_import_json_re_or_typing() -> None:
    code = (
        "import sys\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "from cni.contract import jsoncodec\nfrom cni.plugin import result as cni_result\n"
        'obj = jsoncodec.loads_bytes(b\'{"a": [1, 2.5, "\\\\u00e9"], "b": null}\')\n'
        "text = jsoncodec.dumps(obj) + jsoncodec.dumps(obj, separators=(',', ':'), default=str)\n"
        "v = cni_result.ip_version('10.0.0.1/24') + cni_result.ip_version('fd00:1::5/64')\n"
        "assert v == 10, v\n"
        "bad = sorted({'json', 're', 'typing', 'ipaddress', 'enum'} & set(sys.modules))\n"
        "sys.stdout.write(repr(bad))\n"
    )
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, env={})
    assert out.returncode == 0 and out.stdout == "[]", out.stderr


# ---------------------------------------------------------------------------------------------------
# ip_version vs ipaddress


def _reference_version(text: str) -> int | None:
    try:
        return ipaddress.ip_interface(text).version
    except ValueError:
        return None


def _fast_version(text: str) -> int | None:
    try:
        return cni_result.ip_version(text)
    except ValueError:
        return None


ADDRESSES = [
    "10.0.0.1/24", "10.0.0.1", "0.0.0.0/0", "255.255.255.255/32", "1.2.3.4/33", "1.2.3.4/032", "010.0.0.1/8",
    "1.2.3", "1.2.3.4.5", "256.1.1.1", "1.2.3.4/", "1.2.3.4/24/1", "1.2.3.4/255.255.255.0", "1.2.3.4/+8",
    "fd00::1/64", "::", "::/0", "::1", "1::", "1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8/128", "1:2:3:4:5:6:7::",
    "::2:3:4:5:6:7:8", "1:2:3:4::5:6:7:8", "1::2::3", ":1::2", "1:::2", "12345::", "FD00::ABCD/64",
    "::ffff:1.2.3.4/96", "fe80::1%eth0/64", "fd00::1/129", "g::1", "", "/", " 10.0.0.1/24", "٣.1.1.1/8",
]  # fmt: skip


@pytest.mark.parametrize("text", ADDRESSES)
def test_ip_version_is_ipaddress(text: str) -> None:
    assert _fast_version(text) == _reference_version(text)


def test_ip_version_fuzz() -> None:
    rng = random.Random(20261127)
    alphabet = "0123456789abcdefABCDEF.:/:%"
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert _fast_version(text) == _reference_version(text), text
    for _ in range(3000):
        addr = (
            ipaddress.ip_address(rng.getrandbits(32))
            if rng.random() < 0.5
            else ipaddress.ip_address(rng.getrandbits(128) >> rng.choice([0, 64, 112, 120]))
        )
        text = f"{addr}/{rng.randint(0, 140)}"
        assert _fast_version(text) == _reference_version(text), text
        assert _fast_version(addr.exploded) == addr.version


def test_prev_result_gateway_check_is_ipaddress() -> None:
    for gw in ["10.0.0.1", "fd00::1", "1.2.3.4/24", "::ffff:1.2.3.4", "x", "01.2.3.4", "fe80::1%eth0"]:
        result = {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.5/24", "gateway": gw}]}
        try:
            ipaddress.ip_address(gw)
            expected = True
        except ValueError:
            expected = False
        try:
            cni_result.validate(result, "1.0.0")
            got = True
        except Exception:
            got = False
        assert got == expected, gw


# ---------------------------------------------------------------------------------------------------
# name checks vs the regular expressions they replace


REGEXES = [
    (names.is_container_id, re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,1023}").fullmatch),
    (names.is_uid, re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}").fullmatch),
    (names.is_dns_label, re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?").fullmatch),
    (
        names.is_dns_subdomain,
        re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*").fullmatch,
    ),
    (names.bad_ifname_char, re.compile(r"[/:\s]").search),
    (cni_annotations._is_port_text, re.compile(r"[0-9]{1,5}").fullmatch),
    (cni_annotations._is_cidr_text, re.compile(r"[0-9A-Fa-f.:/]+").fullmatch),
]


@pytest.mark.parametrize(("check", "pattern"), REGEXES)
def test_name_checks_are_the_regexes(check: Any, pattern: Any) -> None:
    rng = random.Random(7)
    alphabet = "aZ09-._/:\t \n\u00a0\u2028é٣"
    samples = ["", "a", "-a", "a-", "a.b", "a..b", ".a", "a" * 63, "a" * 64, "A" * 128, "A" * 129, "x" * 1025]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(20000)]
    for s in samples:
        assert bool(check(s)) == (pattern(s) is not None), repr(s)


def test_rule_target_splits_like_iptables_restore() -> None:
    cases = {
        "-A OUTPUT -p tcp -j HEADRACE_SC_OUTPUT": "HEADRACE_SC_OUTPUT",
        '-A OUTPUT -m comment --comment "a -j X" -j RETURN': "RETURN",
        '-A OUTPUT -m comment --comment "headrace: skip \\"uid\\"" -j RETURN': "RETURN",
        "-A OUTPUT\t-j\tY": "Y",
        "-A OUTPUT -j": None,
    }
    for line, expected in cases.items():
        assert saved.rule_target(line) == expected, line


# ---------------------------------------------------------------------------------------------------
# spawn vs subprocess


def test_spawn_matches_subprocess_for_output_status_and_stdin() -> None:
    big = "line\r\n" * 50000
    jobs: list[tuple[list[str], str | None]] = [
        (["cat"], big),
        (["sh", "-c", "echo out; echo err >&2; exit 3"], None),
        (["sh", "-c", "head -c 10; exit 0"], big),  # stops reading early: no hang, no BrokenPipe escaping
        (["sh", "-c", "cat > /dev/null; printf '%s' \"$HEADRACE_SPAWN_T\""], ""),
    ]
    got = spawn.run_many(jobs, 30)
    for (argv, stdin), result in zip(jobs, got, strict=True):
        ref = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
        assert (result.returncode, result.stdout, result.stderr) == (ref.returncode, ref.stdout, ref.stderr)


def test_spawn_timeout_and_missing_binary() -> None:
    slow, fast = spawn.run_many([(["sleep", "5"], None), (["true"], None)], 0.3)
    assert slow.returncode is None and fast.returncode == 0
    # output closed but still running: the deadline holds for the wait too
    (quiet,) = spawn.run_many([(["sh", "-c", "exec >&- 2>&-; sleep 5"], None)], 0.3)
    assert quiet.returncode is None
    with pytest.raises(FileNotFoundError):
        spawn.run_many([(["true"], None), (["headrace-no-such-binary"], None)], 5)
