"""Policy routing for transparent delivery in a pod netns: what to run and how to read the answers.

Two users, each a `Routing` (priority, fwmark[/mask], table):

- TPROXY (sidecar interceptionMode TPROXY): diverted packets carry TPROXY_MARK; they are delivered
  locally (to the proxy's IP_TRANSPARENT listener) whatever their destination.
- AMBIENT (the node proxy in the pod netns, original-source delivery): the proxy connects to the app with
  IP_TRANSPARENT from the client's own address; the ambient rules restore the connection's conntrack mark
  0x111 onto the app's reply packets, and this routing delivers them to the proxy's socket over lo
  instead of sending them out to the client. Same priority, mark/mask and table as istio-cni
  (pref 32764, fwmark 0x111/0xfff, table 100), so real ztunnel's ENABLE_ORIG_SRC works unchanged.

Per address family the pod netns gets

    ip rule:  pref PREF  from all fwmark MARK[/MASK]  lookup TABLE
    ip route: local default dev lo table TABLE

Each family is one ``ip -4|-6 -force -batch -`` process: ``ip rule add from ::/0`` carries no family
(a /0 prefix sends no address), so one batch cannot hold both families' rules. ``ip rule`` has no
``replace`` and, without a priority, a second ``add`` of the same rule is accepted at the next free
priority: the rule therefore gets a fixed priority, which makes a repeated ``add`` fail with
EEXIST (the kernel compares every attribute), and "File exists" on our add lines is success (the exact
rule/route is already there). Removal deletes exactly these entries ("no such ..." is success).

Pure and stdlib only (imported by the CNI plugin): building the batch text and parsing ip's stderr.
"""

from __future__ import annotations

from cni.contract.constants import AMBIENT_MARK_MASK, TPROXY_MARK, TPROXY_ROUTE_TABLE

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from cni.contract.kinds import Family

RULE_PREF = 32765  # the priority `ip rule add` picks first in a fresh netns (main is 32766)
_ANY = {4: "0.0.0.0/0", 6: "::/0"}
PASSTHROUGH_V6 = "::6/128"  # the sidecar's inbound passthrough source (same as REDIRECT mode puts on lo)


class Routing:
    """One policy routing: `ip rule pref PREF fwmark MARK[/MASK] lookup TABLE` + `local default dev lo`
    in TABLE. `name` prefixes the apply/remove step names; `lo_v6_addr`: an address put on lo with the
    IPv6 entries (never removed: it dies with the netns)."""

    __slots__ = ("lo_v6_addr", "mark", "mask", "name", "pref", "table")

    def __init__(
        self, name: str, pref: int, mark: int, table: int, mask: int | None = None, lo_v6_addr: str | None = None
    ) -> None:
        self.name = name
        self.pref = pref
        self.mark = mark
        self.mask = mask
        self.table = table
        self.lo_v6_addr = lo_v6_addr

    @property
    def fwmark(self) -> str:
        """The fwmark as ip prints it (`ip rule list`): 0x539, or 0x111/0xfff with a mask."""
        return f"{self.mark:#x}" if self.mask is None else f"{self.mark:#x}/{self.mask:#x}"


TPROXY = Routing("tproxy-routes", RULE_PREF, TPROXY_MARK, TPROXY_ROUTE_TABLE, lo_v6_addr=PASSTHROUGH_V6)
# The ambient rules' CONNMARK value on the node proxy's connections to the app (cni.rules.ambient
# CONNMARK_PROXY, istio-cni's in-pod TPROXY mark), restored onto the app's replies.
AMBIENT_REPLY_MARK = 0x111
AMBIENT_PREF = 32764  # istio-cni's priority: before TPROXY's and main
AMBIENT_TABLE = 100  # istio-cni's inbound route table
AMBIENT = Routing("ambient-routes", AMBIENT_PREF, AMBIENT_REPLY_MARK, AMBIENT_TABLE, mask=AMBIENT_MARK_MASK)

# ip's words for "already there" (add) and "not there" (del): EEXIST, ENOENT, ESRCH, a missing table.
_EXISTS = ("File exists",)
_ABSENT = ("No such file or directory", "No such process", "FIB table does not exist")


def rule_line(verb: str, family: Family, routing: Routing = TPROXY) -> str:
    r = routing
    return f"rule {verb} pref {r.pref} from {_ANY[family]} fwmark {r.fwmark} lookup {r.table}"


def route_line(verb: str, family: Family, routing: Routing = TPROXY) -> str:
    return f"route {verb} local {_ANY[family]} dev lo table {routing.table}"


def argv(family: Family) -> list[str]:
    """The batch runner of one family (lines on stdin; -force: every line runs, errors reported per line)."""
    return ["ip", f"-{family}", "-force", "-batch", "-"]


def add_lines(family: Family, routing: Routing = TPROXY) -> list[str]:
    """ADD: (IPv6, TPROXY: the ::6 passthrough address on lo,) the rule, the route."""
    lines = [f"addr replace {routing.lo_v6_addr} dev lo"] if family == 6 and routing.lo_v6_addr else []
    return [*lines, rule_line("add", family, routing), route_line("add", family, routing)]


def del_lines(family: Family, routing: Routing = TPROXY) -> list[str]:
    return [rule_line("del", family, routing), route_line("del", family, routing)]


def check_lines(routing: Routing = TPROXY) -> list[str]:
    return [f"rule list pref {routing.pref}", f"route list table {routing.table}"]


def batch_text(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def failures(stderr: str) -> dict[int, str]:
    """Failed batch lines (1-based) → ip's message, from ``ip -force -batch`` stderr, where each failure
    is its message line(s) followed by ``Command failed -:N``."""
    out: dict[int, str] = {}
    pending: list[str] = []
    for raw in stderr.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("Command failed ") and ":" in line:
            number = line.rsplit(":", 1)[1]
            if number.isdigit():
                out[int(number)] = "; ".join(pending) or "failed"
            pending = []
        else:
            pending.append(line)
    return out


def unexpected(lines: list[str], stderr: str, returncode: int, tolerated: tuple[str, ...]) -> str | None:
    """None when every failed line failed for a tolerated reason; else a description of the first other."""
    failed = failures(stderr)
    if returncode != 0 and not failed:
        return stderr.strip() or f"ip exited {returncode}"
    for number, message in sorted(failed.items()):
        if not any(word in message for word in tolerated):
            what = lines[number - 1] if 0 < number <= len(lines) else f"line {number}"
            return f"'{what}': {message}"
    return None


def add_error(lines: list[str], stderr: str, returncode: int) -> str | None:
    """ADD outcome: rule/route lines may fail with EEXIST (already in place), nothing else may fail."""
    failed = failures(stderr)
    for number in failed:
        if number <= len(lines) and lines[number - 1].startswith("addr "):
            return f"'{lines[number - 1]}': {failed[number]}"
    return unexpected(lines, stderr, returncode, _EXISTS)


def del_error(lines: list[str], stderr: str, returncode: int) -> str | None:
    return unexpected(lines, stderr, returncode, _ABSENT)


def newly_added(lines: list[str], stderr: str) -> list[str]:
    """The rule/route lines of an ADD batch that created their entry (not failed): what a rollback undoes."""
    failed = failures(stderr)
    return [
        line
        for number, line in enumerate(lines, 1)
        if number not in failed and (line.startswith("rule add ") or line.startswith("route add "))
    ]


def undo_lines(added: list[str]) -> list[str]:
    return [line.replace(" add ", " del ", 1) for line in added]


def check_problems(family: Family, stdout: str, routing: Routing = TPROXY) -> list[str]:
    """What is missing of the family's policy routing, from the output of ``check_lines``."""
    r = routing
    rule_ok = route_ok = False
    want_rule = ["from", "all", "fwmark", r.fwmark, "lookup", str(r.table)]
    for raw in stdout.splitlines():
        tokens = raw.split()
        if tokens[:1] == [f"{r.pref}:"] and tokens[1:] == want_rule:
            rule_ok = True
        elif tokens[:4] == ["local", "default", "dev", "lo"]:
            route_ok = True
    problems: list[str] = []
    if not rule_ok:
        problems.append(
            f"IPv{family} policy routing: ip rule 'pref {r.pref} fwmark {r.fwmark} lookup {r.table}' is missing"
        )
    if not route_ok:
        problems.append(f"IPv{family} policy routing: route 'local default dev lo' in table {r.table} is missing")
    return problems
