"""Foreign nftables base chains that run ahead of our redirection in a pod's netns.

Shared by the iptables backend (nft hosts) and the nftables backend. iptables-nft writes our rules into
the nf_tables tables `ip nat` / `ip6 nat` (and `mangle`), whose base chains hook at priority -100 (nat)
and -150 (mangle). Any other nf_tables table in the pod netns can hook its own base chain at prerouting
or output with an earlier priority; `iptables-save` does not show it.
Such a chain can make traffic skip the redirect (a `notrack` at raw priority: the connection never meets
a nat chain; a `meta mark set 0x539`: ambient rules take it for the proxy's own traffic; a `drop`). We do
not judge its statements: in a pod we redirect, nothing but our chains may run at the hooks we use ahead
of our nat chains. A non-empty (or non-accepting) foreign base chain there is drift, and the repair
removes that chain (its table and its other chains stay) — the one case where the agent deletes rules
that are not its own, because no position of ours can come before an earlier hook priority.

Who owns what depends on the backend: with iptables, the iptables-nft tables and our `inet headrace` are
ours (`iptables_owned`); with the nftables backend only `inet headrace` is (`nftables_owned`), so an
iptables-nft nat or raw chain in the pod is as foreign as any other table. Our nftables chains hook mangle
(-150) and nat (-100) too, so the same threshold (at or before -100) applies to both backends. In the
kernel, NAT-type chains run in priority order until one of them binds a NAT: a foreign nat chain's plain
`accept` lets ours still run, a foreign `redirect`/`dnat` wins; a `notrack` before conntrack (-200)
means no nat chain runs at all; a mark set before our nat chains makes an ambient pod's traffic look like
the proxy's own. Statements are not judged: any non-empty or non-accepting such chain is drift.

Pure parts (`parse_ruleset`, `ahead_of_redirect`, `removal_script`) are unit-tested; `read`/`remove`
run in the netns with libnftables in-process (`nftables.libnft`), or `nft` through nsenter without it.
`read` first asks the netns for its table names (`nft_table_dump`, one netlink dump): a netns with no
table but iptables-nft's and ours (a new pod's, one being enrolled, one holding only our rules) holds no
foreign chain, and its ruleset is not read.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cni.rules.rule_text import OWNED_PREFIX
from node_agent.backends.nft_table_dump import NftTableDumpError, tables_here
from node_agent.kernel.netns_runner import run_in_netns

NAT_PRIORITY = -100  # iptables-nft's nat chains; mangle (-150) and raw (-300) come before it
HOOKS = ("prerouting", "output")
IPTABLES_TABLES = frozenset({"filter", "nat", "mangle", "raw", "security"})
OWN_TABLE = "headrace"  # the nftables backend's per-pod table (inet headrace): ours, never foreign
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,255}$")


class NftForeignError(Exception):
    """nft could not be run or its answer not read."""


@dataclass(frozen=True)
class BaseChain:
    family: str
    table: str
    name: str
    handle: int
    hook: str
    priority: int
    policy: str
    rules: int
    jumps_to_ours: int = 0  # rules whose verdict is a jump into one of our iptables chains (HEADRACE_*)

    def only_our_jumps(self) -> bool:
        """An iptables-nft chain holding nothing but the iptables backend's jumps (a pod it redirected,
        moving to the nftables backend)."""
        return 0 < self.rules == self.jumps_to_ours and self.policy == "accept"

    def describe(self) -> str:
        return (f"{self.family} {self.table} {self.name} (hook {self.hook}, priority {self.priority}, "
                f"policy {self.policy}, {self.rules} rules)")


def parse_ruleset(text: str) -> list[BaseChain]:
    """Base chains of `nft -j list ruleset` with their rule counts. NftForeignError on bad JSON."""
    try:
        items = json.loads(text).get("nftables", [])
    except (ValueError, AttributeError) as exc:
        raise NftForeignError(f"nft -j output unreadable: {exc}") from None
    counts: dict[tuple[str, str, str], int] = {}
    ours: dict[tuple[str, str, str], int] = {}
    chains: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("chain"), dict) and "hook" in item["chain"]:
            chains.append(item["chain"])
        elif isinstance(item.get("rule"), dict):
            r = item["rule"]
            key = (str(r.get("family")), str(r.get("table")), str(r.get("chain")))
            counts[key] = counts.get(key, 0) + 1
            if jumps_to_ours(r.get("expr")):
                ours[key] = ours.get(key, 0) + 1
    out = []
    for c in chains:
        fam, table, name = str(c.get("family")), str(c.get("table")), str(c.get("name"))
        try:
            prio, handle = int(c.get("prio", 0)), int(c.get("handle", 0))
        except (TypeError, ValueError):
            continue
        key = (fam, table, name)
        out.append(BaseChain(fam, table, name, handle, str(c.get("hook")), prio, str(c.get("policy", "accept")),
                             counts.get(key, 0), ours.get(key, 0)))
    return out


def jumps_to_ours(expr: object) -> bool:
    """Whether a rule's expressions end in a jump into one of our iptables chains."""
    last = expr[-1] if isinstance(expr, list) and expr else None
    jump = last.get("jump") if isinstance(last, dict) else None
    target = jump.get("target") if isinstance(jump, dict) else None
    return isinstance(target, str) and target.startswith(OWNED_PREFIX)


def iptables_owned(c: BaseChain) -> bool:
    """iptables-nft's tables (checked through iptables-save) and our nftables backend's table."""
    return iptables_owned_table(c.family, c.table)


def iptables_owned_table(family: str, table: str) -> bool:
    return (family in ("ip", "ip6") and table in IPTABLES_TABLES) or table == OWN_TABLE


def nftables_owned(c: BaseChain) -> bool:
    """The nftables backend's own table (`inet headrace`); everything else, iptables-nft's too, is foreign."""
    return c.family == "inet" and c.table == OWN_TABLE


def ahead_of_redirect(chains: list[BaseChain], families: tuple[int, ...],
                      owned: Callable[[BaseChain], bool] = iptables_owned) -> list[BaseChain]:
    """Foreign base chains that see a pod's traffic before our nat chains do and can act on it."""
    fams = {"inet"} | {"ip" if f == 4 else "ip6" for f in families}
    return [c for c in chains
            if c.family in fams and c.hook in HOOKS and c.priority <= NAT_PRIORITY and not owned(c)
            and (c.rules > 0 or c.policy != "accept")]


def problems_of(found: list[BaseChain]) -> list[str]:
    return [f"foreign nftables chain ahead of our redirect: {c.describe()}" for c in found]


def removal_script(found: list[BaseChain]) -> str:
    """An `nft -f` script removing these chains in one transaction. ValueError on a name nft would need
    quoting for (such a chain is reported, not removed)."""
    lines = []
    for c in found:
        for part in (c.family, c.table, c.name):
            if not _NAME.match(part):
                raise ValueError(f"unexpected nftables name {part!r}")
        lines.append(f"flush chain {c.family} {c.table} {c.name}")
        lines.append(f"delete chain {c.family} {c.table} handle {c.handle}")
    return "\n".join(lines) + "\n" if lines else ""


def _nft(netns_path: str, args: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(["nsenter", f"--net={netns_path}", "nft", *args], input=stdin, capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NftForeignError(f"nft {' '.join(args)}: {exc}") from exc
    if done.returncode != 0:
        raise NftForeignError(f"nft {' '.join(args)}: {done.stderr.strip()[:300]}")
    return done.stdout


def _in_process(netns_path: str, text: str, json_out: bool) -> str | None:
    """`text` run by libnftables in the netns (no process); None when the binding is not installed."""
    from node_agent.backends.base import BackendError
    from node_agent.backends.nftables import libnft

    try:
        libnft.load()
    except BackendError:
        return None
    try:
        (result,) = libnft.run_in_netns(netns_path, [text], json=json_out)
    except BackendError as exc:
        raise NftForeignError(str(exc)) from exc
    if result.rc != 0:
        raise NftForeignError(f"nft {text.splitlines()[0]}: {result.error.strip()[:300]}")
    return result.output


def read(netns_path: str, families: tuple[int, ...]) -> list[BaseChain]:
    """The foreign base chains ahead of our redirect in the netns (libnftables in-process, else `nft`);
    none, without reading the ruleset, when the netns holds no table but iptables-nft's and ours."""
    if only_owned_tables(netns_path):
        return []
    text = _in_process(netns_path, "list ruleset", True)
    if text is None:
        text = _nft(netns_path, ["-j", "list", "ruleset"])
    return ahead_of_redirect(parse_ruleset(text), families)


def only_owned_tables(netns_path: str) -> bool:
    """Whether every nf_tables table in the netns is iptables-nft's or ours (none at all included), so
    that no chain there can be foreign (`iptables_owned`); False when that cannot be told."""
    try:
        tables = run_in_netns(netns_path, tables_here, timeout=5.0)
    except (OSError, NftTableDumpError):  # cannot enter, no answer: the full read decides and reports
        return False
    return all(iptables_owned_table(family, name) for family, name in tables)


def remove(netns_path: str, found: list[BaseChain]) -> None:
    script = removal_script(found)
    if script and _in_process(netns_path, script, False) is None:
        _nft(netns_path, ["-f", "-"], stdin=script)
