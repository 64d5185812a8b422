"""The relayed commands (protocol version 3 of the plugin socket): the plugin's launcher hands a CNI ADD,
DEL, GC or STATUS to a running agent as it came — the runtime's CNI_* environment and the network
configuration on stdin — and the agent runs the plugin's own code for it (`cni.plugin.relayed`) in its
warm process, then answers with what the plugin prints. The plugin's hot path is then interpreter
start-up and this one exchange: no module of the plugin beyond the launcher and this one is imported.
Besides the ADD, a runtime runs a DEL for every pod that leaves the node, STATUS all the time (containerd
2 for every Status call the kubelet makes, every 5 s) and GC now and then; CHECK and VERSION are not
relayed.

Request (plugin -> agent), one line:
    {"v": 3, "cmd": "ADD" | "DEL" | "GC" | "STATUS",
     "env": {"CNI_COMMAND": <the same>, "CNI_CONTAINERID": str, ...},
     "stdin": <the network configuration object, as given>}
    Only the names in ENV_KEYS are sent, each value printable ASCII (anything else: not relayed); the
    configuration's line breaks become spaces (outside JSON strings they are whitespace, inside they are
    invalid anyway, and the agent then refuses the request as the plugin would refuse the text).

Replies (agent -> plugin): a header line of ASCII words, then its payload:
    HR3 done <exit status> <n>\\n<n bytes>   the command ran: the bytes are the plugin's stdout (the CNI
                                              result, nothing for a DEL, a GC or a STATUS that is ready,
                                              or the CNI error object with status 1)
    HR3 standalone\\n                         the agent will not run this command (another agent socket in the
                                              configuration, a pod it does not know, ...): the plugin runs
                                              its own path (an ADD's without asking this agent again; a
                                              DEL's still tells it, as when nothing was relayed)
    HR3 wait <milliseconds>\\n                the agent holds the pod (an ADD's ambient enrolment or eBPF
                                              sidecar, a DEL's removal): `done` follows within that time,
                                              or an ADD fails closed (a DEL runs the plugin's own)
Anything else (a version 1 or 2 failure line from an agent that cannot take the request, a closed
connection) means the agent is not usable for this command. A STATUS or a GC is never held.

Pure and stdlib only, no imports: the launcher loads it before anything else.
"""

from __future__ import annotations

VERSION = 3
MAGIC = b"HR3"
DONE = "done"
STANDALONE = "standalone"
WAIT = "wait"
ENV = "env"  # request fields (beside cni.contract.events' "v" and "cmd")
STDIN = "stdin"
COMMANDS = ("ADD", "DEL", "GC", "STATUS")  # the CNI commands relayed
ENV_KEYS = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")
MAX_LINE_BYTES = 65536  # the server's request line limit (cni.contract.events takes it from here)
MAX_HEADER_BYTES = 64
MAX_OUTPUT_BYTES = 1 << 20  # a CNI result larger than this is not the plugin's


def _quoted(value: str) -> str | None:
    """A JSON string for a printable ASCII value (None otherwise: the plugin's own path reports it)."""
    if not value.isascii() or not value.isprintable():
        return None
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def request_line(env: dict[str, str], stdin: bytes) -> bytes | None:
    """The request line, or None when this invocation cannot be relayed as it is (then the plugin runs its
    normal path, which reports what is wrong with it); None too for a command that is not relayed."""
    command = env.get("CNI_COMMAND")
    if command not in COMMANDS:
        return None
    fields = []
    for key in ENV_KEYS:
        value = env.get(key)
        if value is None:
            continue
        quoted = _quoted(value)
        if quoted is None:
            return None
        fields.append(f'"{key}":{quoted}')
    config = stdin.strip()
    if not config.startswith(b"{") or not config.endswith(b"}"):
        return None
    config = config.replace(b"\n", b" ").replace(b"\r", b" ")
    head = f'{{"v":{VERSION},"cmd":"{command}","{ENV}":{{' + ",".join(fields) + f'}},"{STDIN}":'
    line = head.encode() + config + b"}\n"
    return line if len(line) <= MAX_LINE_BYTES else None


def done_frame(status: int, output: bytes) -> bytes:
    return b"%s %s %d %d\n" % (MAGIC, DONE.encode(), status, len(output)) + output


def standalone_frame() -> bytes:
    return b"%s %s\n" % (MAGIC, STANDALONE.encode())


def wait_frame(seconds: float) -> bytes:
    return b"%s %s %d\n" % (MAGIC, WAIT.encode(), max(0, round(seconds * 1000)))


def parse_header(line: bytes) -> tuple[str, int, int] | None:
    """(kind, a, b) of a reply header: done -> (status, payload length), wait -> (milliseconds, 0),
    standalone -> (0, 0); None for anything that is not one."""
    words = line.split()
    if len(words) < 2 or words[0] != MAGIC:
        return None
    kind = words[1].decode("ascii", "replace")
    numbers = words[2:]
    if not all(w.isdigit() and len(w) <= 10 for w in numbers):
        return None
    if kind == DONE and len(numbers) == 2 and int(numbers[0]) <= 255 and int(numbers[1]) <= MAX_OUTPUT_BYTES:
        return kind, int(numbers[0]), int(numbers[1])
    if kind == WAIT and len(numbers) == 1:
        return kind, int(numbers[0]), 0
    if kind == STANDALONE and not numbers:
        return kind, 0, 0
    return None
