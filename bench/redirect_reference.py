"""Reference modes of bench/redirect_overhead.py: what netfilter interception costs without NAT.

Not backends of headrace: two fixed nftables rule sets the bench puts in the client pod's netns (`nft -f`
there, and `ip rule` / `ip route` for the second), to bound what any netfilter backend can reach:
- `nft-hooks`: a table with base chains at the hooks a capture needs (route-type output, filter
  prerouting, priority mangle) whose rules run for every TCP packet but capture nothing (the client dials
  the proxy, as in `direct`): the cost of having the hooks at all;
- `nft-tproxy-out`: outbound capture without conntrack or NAT. Output marks the app's TCP (not the
  proxy's, not to loopback), the mark routes it to `lo` (a policy rule and a `local default` route of
  its own), prerouting hands it to the proxy's transparent listener with `tproxy`, which finds the
  original destination as its socket's own address. No rule here uses conntrack, so it stays off in
  the netns.
The proxy listener has IP_TRANSPARENT and takes the original destination from its socket's address when
there is no SO_ORIGINAL_DST (bench/redirect_workers.py), so the same proxy serves every mode.
"""

from __future__ import annotations

import subprocess
from typing import Protocol

from node_agent.backends.base import BackendError, PodTarget, RedirectSpec
from node_agent.lab.netns import run_in

from cni.contract.constants import PROXY_UID

REFERENCE_MODES = ("nft-hooks", "nft-tproxy-out")
DIALS_PROXY = ("direct", "nft-hooks")  # the modes whose client dials the proxy (no capture)
TABLE = "hrbench"
MARK = 0x539
ROUTE_TABLE = "133"


class Redirector(Protocol):
    """What the bench's phases ask of a mode: a backend of headrace, or a reference rule set."""

    def apply(self, target: PodTarget, spec: RedirectSpec) -> None: ...

    def remove(self, target: PodTarget) -> None: ...


def ruleset(mode: str, proxy_port: int) -> str:
    """The `nft -f` text of a reference mode (one `inet` table)."""
    if mode == "nft-hooks":
        out_verdict, pre_rule = f"meta mark {MARK:#x} return", f"meta mark {MARK:#x} return"
    elif mode == "nft-tproxy-out":
        out_verdict = f"meta mark set {MARK:#x}"
        pre_rule = f'iifname "lo" meta mark {MARK:#x} tproxy ip to :{proxy_port} accept'
    else:
        raise ValueError(f"unknown reference mode {mode!r}")
    return (
        f"table inet {TABLE} {{\n"
        "  chain out {\n"
        "    type route hook output priority mangle; policy accept;\n"
        f"    meta l4proto tcp meta skuid {PROXY_UID} return\n"
        '    meta l4proto tcp oifname "lo" return\n'
        "    meta l4proto tcp ip daddr 127.0.0.0/8 return\n"
        f"    meta l4proto tcp {out_verdict}\n"
        "  }\n"
        "  chain pre {\n"
        "    type filter hook prerouting priority mangle; policy accept;\n"
        f"    meta l4proto tcp {pre_rule}\n"
        "  }\n"
        "}\n"
    )


class ReferenceRules:
    """A reference mode as the bench's phases use a backend: apply before measuring, remove after."""

    def __init__(self, mode: str, proxy_port: int) -> None:
        self.mode = mode
        self.text = ruleset(mode, proxy_port)

    def _routes(self) -> list[list[str]]:
        return [["ip", "rule", "add", "fwmark", str(MARK), "lookup", ROUTE_TABLE],
                ["ip", "route", "add", "local", "default", "dev", "lo", "table", ROUTE_TABLE]]  # fmt: skip

    def apply(self, target: PodTarget, spec: RedirectSpec) -> None:
        """BackendError when the rules cannot go in here (the bench then leaves the mode out)."""
        try:
            run_in(target.netns_path, ["nft", "-f", "-"], input=self.text)
            if self.mode == "nft-tproxy-out":
                for argv in self._routes():
                    run_in(target.netns_path, argv)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) and e.stderr else str(e)
            raise BackendError(f"reference mode {self.mode}: {detail}") from e

    def remove(self, target: PodTarget) -> None:
        """Everything apply made, gone; what is missing already is no error (a phase that failed half-way)."""
        run_in(target.netns_path, ["nft", "delete", "table", "inet", TABLE], check=False)
        if self.mode == "nft-tproxy-out":
            run_in(target.netns_path, ["ip", "rule", "del", "fwmark", str(MARK), "lookup", ROUTE_TABLE], check=False)
            run_in(target.netns_path, ["ip", "route", "flush", "table", ROUTE_TABLE], check=False)
