"""Which iptables flavour (legacy or nft) the host uses; rules of one flavour are invisible to the other.

"auto" looks at the real rules of the current netns: it counts `-A` rule lines in iptables-legacy-save and
iptables-nft-save (both families). Bare chain headers are not counted: Istio's line-count heuristic chose
legacy on nft hosts because an empty legacy table prints more header lines than a few nft rules.
A tie (including no rules at all) means nft, the default of current distributions.
Cheap first look: when /proc/net/ip_tables_names and ip6_tables_names are empty no legacy table exists,
so nothing has to be run at all.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:  # no typing/shutil/subprocess at import: the CNI plugin imports this module
    from typing import Literal

    Flavour = Literal["legacy", "nft"]
else:
    Flavour = str  # importable at run time (node_agent); only type checkers look at its value

FLAVOURS: tuple[Flavour, ...] = ("legacy", "nft")
SETTINGS = ("auto", "legacy", "nft")
_TIMEOUT = 30.0

_cache: dict[str, Flavour] = {}


def binary(flavour: Flavour, family: int, tool: Literal["save", "restore"]) -> str:
    """The executable name, e.g. ip6tables-nft-restore."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown iptables flavour {flavour!r}")
    if family not in (4, 6):
        raise ValueError(f"address family must be 4 or 6, not {family!r}")
    prefix = "iptables" if family == 4 else "ip6tables"
    return f"{prefix}-{flavour}-{tool}"


def count_rule_lines(save_text: str) -> int:
    """Rule lines (`-A ...`) of an iptables-save dump; chain headers and comments do not count."""
    return sum(1 for line in save_text.splitlines() if line.startswith("-A "))


def choose(legacy_rules: int, nft_rules: int) -> Flavour:
    """Legacy only when it holds strictly more rules; a tie (e.g. none anywhere) means nft."""
    return "legacy" if legacy_rules > nft_rules else "nft"


def legacy_tables_present(proc_net: str = "/proc/net") -> bool:
    for name in ("ip_tables_names", "ip6_tables_names"):
        try:
            with open(os.path.join(proc_net, name), encoding="ascii") as f:
                if f.read().strip():
                    return True
        except OSError:
            continue
    return False


def _installed(flavour: Flavour) -> bool:
    from cni.kernel.executables import on_path

    return on_path(binary(flavour, 4, "save"))


def _count(flavour: Flavour, netns_path: str | None) -> int:
    import subprocess  # "auto" detection only (once per process)

    total = 0
    for family in (4, 6):
        argv = [binary(flavour, family, "save")]
        if netns_path is not None:
            argv = ["nsenter", f"--net={netns_path}", "--", *argv]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if proc.returncode == 0:
            total += count_rule_lines(proc.stdout)
    return total


def detect(netns_path: str | None = None) -> Flavour:
    """Detect the flavour from the rules of netns_path (None: the current netns). Not cached."""
    have_legacy, have_nft = _installed("legacy"), _installed("nft")
    if have_legacy != have_nft:
        return "legacy" if have_legacy else "nft"
    if netns_path is None and not legacy_tables_present():
        return "nft"
    legacy = _count("legacy", netns_path)
    if legacy == 0:
        return "nft"
    return choose(legacy, _count("nft", netns_path))


def resolve(setting: str) -> Flavour:
    """The conflist/agent setting → a flavour. "auto" detects once per process (current netns)."""
    if setting == "legacy":
        return "legacy"
    if setting == "nft":
        return "nft"
    if setting != "auto":
        raise ValueError(f"iptables flavour must be one of 'auto', 'legacy', 'nft'; got {setting!r}")
    cached = _cache.get("auto")
    if cached is None:
        cached = detect(None)
        _cache["auto"] = cached
    return cached


def clear_cache() -> None:
    """Forget the detected flavour (tests)."""
    _cache.clear()
