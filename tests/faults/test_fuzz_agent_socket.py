"""Property-based fuzzing of the agent's plugin-event socket (cni/contract/events.py framing,
node_agent/serve/cni_request.py validation, the CniServer over a real unix socket).

- any request line: `parse_request` returns a request whose every field is valid, or RequestError; never
  another exception;
- the framing: `read_line` returns the first line however the bytes are chunked, and `decode_line` of
  `encode_line` is the identity for any JSON object;
- the server, fed arbitrary bytes in arbitrary chunks (sometimes closing early): it answers one JSON
  object (or closes when the client went away), never calls the handler for an invalid request, keeps
  serving a valid request afterwards, and every connection slot is given back.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from node_agent.serve.cni_admission import Admission
from node_agent.serve.cni_request import PluginRequest, RequestError, parse_request
from node_agent.serve.cni_server import CniServer

from cni.contract import events
from cni.contract.pod_uid import valid_uid
from cni.plugin.agent_client import PluginEvent, send_event
from tests.faults.plugin_inputs import FUZZ, json_value
from tests.unit.test_agent_cni_server import UID, Handler

pytestmark = pytest.mark.faults

PARSE_CASES = 1200
FRAMING_CASES = 500
SERVER_CASES = 200

fields = {
    events.VERSION: st.sampled_from([1, 1, 1, 2, 0, True, "1", 1.0, None]),
    events.CMD: st.sampled_from(["ADD", "DEL", "CHECK", "STATUS", "add", "", "RM"]) | json_value,
    events.NETNS: st.sampled_from(["/var/run/netns/p", "", "rel", "/a\0b", "/" + "x" * 5000]) | json_value,
    events.IPS: st.lists(st.sampled_from(["10.0.0.1", "10.0.0.1/24", "fd00::1", "x", "300.1.1.1", ""])
                         | st.text(max_size=8), max_size=20) | json_value,
    events.MODE: st.sampled_from(["ambient", "sidecar", "none"]) | json_value,
    events.CONTAINER_ID: st.text(max_size=10) | json_value,
    events.POD: st.fixed_dictionaries({}, optional={
        events.POD_UID: st.sampled_from([UID, "", "../x", "a\n", "a" * 129, "é"]) | json_value,
        events.POD_NAMESPACE: st.sampled_from(["app", "", "App", "a.b", "a\n", "-a"]) | json_value,
        events.POD_NAME: st.sampled_from(["web", "", "we b", "web\n", "x" * 300]) | json_value,
    }) | json_value,
}
VALID = {events.VERSION: 1, events.CMD: "ADD", events.NETNS: "/var/run/netns/p", events.IPS: ["10.0.0.1"],
         events.MODE: "ambient", events.CONTAINER_ID: "c", events.POD: {events.POD_UID: UID,
                                                                     events.POD_NAMESPACE: "app",
                                                                     events.POD_NAME: "web"}}


@st.composite
def request_objects(draw: st.DrawFn) -> dict[str, Any]:
    """A valid request with up to three fields replaced or removed (often still valid), or any object."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.fixed_dictionaries({}, optional=fields))
    obj: dict[str, Any] = json.loads(json.dumps(VALID))
    obj[events.CMD] = draw(st.sampled_from(events.COMMANDS))
    for key in draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True)):
        if draw(st.integers(0, 4)) == 0:
            obj.pop(key, None)
        else:
            obj[key] = draw(fields[key])
    return obj


request_lines = st.one_of(
    request_objects().map(lambda o: json.dumps(o).encode()),
    request_objects().map(lambda o: json.dumps(o).encode()),
    st.binary(max_size=300),
    st.integers(1, 20000).map(lambda n: b"[" * n + b"]" * n),
)


def assert_valid(req: PluginRequest) -> None:
    assert req.cmd in events.COMMANDS
    if req.cmd == events.STATUS:
        return
    assert req.uid == "" or valid_uid(req.uid)
    assert req.mode in events.MODES
    assert req.netns == "" or (req.netns.startswith("/") and "\0" not in req.netns and len(req.netns) <= 4096)
    assert req.cmd != events.ADD or req.netns
    for ip in req.ips:
        ipaddress.ip_address(ip)
    for name in (req.namespace, req.name):
        assert "\n" not in name and name == name.strip()


def test_fuzz_parse_request() -> None:
    tally = {"cases": 0, "accepted": 0}

    @settings(FUZZ, max_examples=PARSE_CASES)
    @given(line=request_lines)
    def case(line: bytes) -> None:
        tally["cases"] += 1
        try:
            req = parse_request(line)
        except RequestError:
            return
        tally["accepted"] += 1
        assert_valid(req)

    case()
    print(f"\nplugin socket requests: {json.dumps(tally)}")
    assert tally["accepted"] > 100


class Chunks:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def settimeout(self, value: float | None) -> None:
        pass

    def recv(self, size: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def test_fuzz_framing() -> None:
    @settings(FUZZ, max_examples=FRAMING_CASES)
    @given(obj=st.dictionaries(st.text(max_size=6), json_value, max_size=5), tail=st.binary(max_size=50),
           cuts=st.lists(st.integers(1, 40), max_size=10))
    def case(obj: dict[str, Any], tail: bytes, cuts: list[int]) -> None:
        data = events.encode_line(obj) + tail
        assert events.decode_line(data.split(b"\n", 1)[0]) == json.loads(json.dumps(obj))
        chunks, rest = [], data
        for n in cuts:
            chunks.append(rest[:n])
            rest = rest[n:]
        chunks.append(rest)
        line = events.read_line(Chunks([c for c in chunks if c]), time.monotonic() + 5)
        assert line == data.split(b"\n", 1)[0]

    case()


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[CniServer, Handler, str]]:
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="hr-fuzzsock-"))
    handler = Handler()
    srv = CniServer(str(tmp / "cni.sock"), handler, add_timeout=2.0, check_netns=lambda path: None,
                    admission=Admission(per_peer=1000))
    srv.start()
    try:
        yield srv, handler, str(tmp / "cni.sock")
    finally:
        srv.stop()
        (tmp / "cni.sock").unlink(missing_ok=True)
        tmp.rmdir()


def test_fuzz_server(server: tuple[CniServer, Handler, str]) -> None:
    srv, handler, path = server
    tally = {"cases": 0, "answered": 0, "handled": 0}

    @settings(FUZZ, max_examples=SERVER_CASES)
    @given(line=request_lines, newline=st.booleans(), cuts=st.lists(st.integers(1, 64), max_size=4),
           close_early=st.booleans())
    def case(line: bytes, newline: bool, cuts: list[int], close_early: bool) -> None:
        calls_before = len(handler.calls)
        data = line + (b"\n" if newline else b"")
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(path)
            rest = data
            try:  # the server answers at the first newline and closes: later sends may fail
                for n in cuts:
                    s.sendall(rest[:n])
                    rest = rest[n:]
                s.sendall(rest)
                if close_early or not newline:
                    s.shutdown(socket.SHUT_WR)  # the client stops sending: the line ends here
            except (BrokenPipeError, ConnectionResetError):
                pass
            buf = b""
            while True:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                buf += chunk
        tally["cases"] += 1
        if buf:
            assert buf.endswith(b"\n") and buf.count(b"\n") == 1, buf[:200]
            reply = json.loads(buf)
            assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
            tally["answered"] += 1
        try:
            valid = parse_request(data.split(b"\n", 1)[0])
        except RequestError:
            valid = None
        if valid is None:
            assert len(handler.calls) == calls_before, "an invalid request reached the handler"
        elif len(handler.calls) > calls_before:
            tally["handled"] += 1

    case()
    event = PluginEvent("ADD", "c", "/var/run/netns/p", "eth0", "app", "web", UID, ("10.1.0.4",), "ambient")
    assert send_event(path, event, timeout=5).ok  # still serving
    deadline = time.monotonic() + 5
    while srv.admission.counts()["reading"] + srv.admission.counts()["handling"] and time.monotonic() < deadline:
        time.sleep(0.05)
    counts = srv.admission.counts()
    assert counts["reading"] == 0 and counts["handling"] == 0 and counts["peers"] == 0, counts
    print(f"\nplugin socket server: {json.dumps(tally)}")
