"""Policy routing of TPROXY inbound interception in a pod netns: what to run and how to read the answers.

TPROXY-diverted packets carry the mark TPROXY_MARK; per address family the pod netns gets

    ip rule:  pref RULE_PREF  from all fwmark TPROXY_MARK  lookup TPROXY_ROUTE_TABLE
    ip route: local default dev lo table TPROXY_ROUTE_TABLE

so they are delivered locally (to the proxy's IP_TRANSPARENT listener) whatever their destination.
Each family is one ``ip -4|-6 -force -batch -`` process: ``ip rule add from ::/0`` carries no family
(a /0 prefix sends no address), so one batch cannot hold both families' rules. ``ip rule`` has no
``replace`` and, without a priority, a second ``add`` of the same rule is accepted at the next free
priority: the rule therefore gets the fixed priority RULE_PREF, which makes a repeated ``add`` fail with
EEXIST (the kernel compares every attribute), and "File exists" on our add lines is success (the exact
rule/route is already there). Removal deletes exactly these entries ("no such ..." is success).

Pure and stdlib only (imported by the CNI plugin): building the batch text and parsing ip's stderr.
"""

from __future__ import annotations

from cni.contract.constants import TPROXY_MARK, TPROXY_ROUTE_TABLE

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from cni.contract.kinds import Family

RULE_PREF = 32765  # the priority `ip rule add` picks first in a fresh netns (main is 32766)
_ANY = {4: "0.0.0.0/0", 6: "::/0"}
PASSTHROUGH_V6 = "::6/128"  # the sidecar's inbound passthrough source (same as REDIRECT mode puts on lo)

# ip's words for "already there" (add) and "not there" (del): EEXIST, ENOENT, ESRCH, a missing table.
_EXISTS = ("File exists",)
_ABSENT = ("No such file or directory", "No such process", "FIB table does not exist")


def rule_line(verb: str, family: Family) -> str:
    return f"rule {verb} pref {RULE_PREF} from {_ANY[family]} fwmark {TPROXY_MARK:#x} lookup {TPROXY_ROUTE_TABLE}"


def route_line(verb: str, family: Family) -> str:
    return f"route {verb} local {_ANY[family]} dev lo table {TPROXY_ROUTE_TABLE}"


def argv(family: Family) -> list[str]:
    """The batch runner of one family (lines on stdin; -force: every line runs, errors reported per line)."""
    return ["ip", f"-{family}", "-force", "-batch", "-"]


def add_lines(family: Family) -> list[str]:
    """ADD: (IPv6: the ::6 passthrough address on lo,) the rule, the route."""
    lines = [f"addr replace {PASSTHROUGH_V6} dev lo"] if family == 6 else []
    return [*lines, rule_line("add", family), route_line("add", family)]


def del_lines(family: Family) -> list[str]:
    return [rule_line("del", family), route_line("del", family)]


def check_lines() -> list[str]:
    return [f"rule list pref {RULE_PREF}", f"route list table {TPROXY_ROUTE_TABLE}"]


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


def check_problems(family: Family, stdout: str) -> list[str]:
    """What is missing of the family's policy routing, from the output of ``check_lines``."""
    rule_ok = route_ok = False
    want_rule = ["from", "all", "fwmark", f"{TPROXY_MARK:#x}", "lookup", str(TPROXY_ROUTE_TABLE)]
    for raw in stdout.splitlines():
        tokens = raw.split()
        if tokens[:1] == [f"{RULE_PREF}:"] and tokens[1:] == want_rule:
            rule_ok = True
        elif tokens[:4] == ["local", "default", "dev", "lo"]:
            route_ok = True
    problems: list[str] = []
    if not rule_ok:
        problems.append(
            f"IPv{family} policy routing: ip rule 'pref {RULE_PREF} fwmark {TPROXY_MARK:#x} "
            f"lookup {TPROXY_ROUTE_TABLE}' is missing"
        )
    if not route_ok:
        problems.append(
            f"IPv{family} policy routing: route 'local default dev lo' in table {TPROXY_ROUTE_TABLE} is missing"
        )
    return problems
