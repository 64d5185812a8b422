"""Choose the node's redirection backend: `auto`, `iptables`, `nftables` or `ebpf`.

auto  -> eBPF when bcc, kernel headers, cgroup2 and a probe program load all work, else iptables, or
         nftables on a host without an iptables binary (the reason is logged and returned);
ebpf  -> eBPF or BackendError naming what is missing and how to supply it (enrolment fails closed);
iptables -> iptables; nftables -> nftables (libnftables in-process; BackendError when it is missing).
The eBPF backend captures inbound with TC + bpf_sk_assign, except for ambient pods: their inbound goes to
the rule-based backend (iptables, or nftables without an iptables binary), whose CONNMARK and policy routing
bring the app's replies to the node proxy's original-source connections back to the proxy (TC eBPF keeps no
connection marks; on a node with two CPUs or more an iptables one is written by a child process beside the
agent: `rules_helper`). inbound="iptables" hands every pod's inbound capture to an iptables backend of the same
flavour instead (see docs/ebpf.md).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal, NamedTuple

from node_agent.backends.base import BackendError, RedirectBackend

log = logging.getLogger("headrace.backend.select")
SETTINGS = ("auto", "iptables", "nftables", "ebpf")
IPTABLES_BINARIES = ("iptables", "iptables-restore", "iptables-nft-restore", "iptables-legacy-restore")
DEFAULT_STATE_DIR = Path("/var/run/headrace")


class BackendChoice(NamedTuple):
    """The node's backend and why it was chosen."""

    backend: RedirectBackend
    reason: str


def _iptables(flavour: str, change_count_dir: Path | None = None) -> RedirectBackend:
    """change_count_dir: the node's own backend (not an eBPF node's rules part) counts x_tables changes
    on legacy hosts, with the agent's state dir as its scratch and object cache."""
    from node_agent.backends.iptables.backend import IptablesBackend

    backend: RedirectBackend = IptablesBackend(flavour, change_count_dir=change_count_dir)
    return backend


def _nftables() -> RedirectBackend:
    from node_agent.backends.nftables.backend import NftablesBackend

    backend: RedirectBackend = NftablesBackend()
    return backend


def iptables_installed() -> bool:
    """Whether this host has an iptables binary (either flavour) on PATH."""
    return any(shutil.which(name) is not None for name in IPTABLES_BINARIES)


def rules_backend_setting(iptables_present: bool | None = None) -> Literal["iptables", "nftables"]:
    """The rule-based backend of this host: iptables, or nftables where no iptables binary is installed
    (what `auto` falls back to without eBPF, and what serves the pods an eBPF node declines)."""
    present = iptables_installed() if iptables_present is None else iptables_present
    return "iptables" if present else "nftables"


def ambient_inbound_rules(iptables_flavour: str, iptables_present: bool | None = None) -> RedirectBackend:
    """The rules backend an eBPF node keeps ambient pods' inbound on (`rules_backend_setting`)."""
    return _iptables(iptables_flavour) if rules_backend_setting(iptables_present) == "iptables" else _nftables()


def ebpf_problems(state_dir: Path = DEFAULT_STATE_DIR, background: bool = False) -> list[str]:
    """What stops eBPF here; the compiled object is kept in <state_dir>/bpf-cache between agent runs.
    background (`auto`): on the first start (nothing cached) compile in the background, the agent serving
    meanwhile (pods go to iptables until the object is ready); otherwise (`ebpf`) compile now."""
    from node_agent.backends.ebpf import loader
    from node_agent.backends.ebpf.probe import probe

    return probe(cache_dir=state_dir / loader.CACHE_DIR, background=background)


def select_backend(
    setting: str,
    *,
    state_dir: str | Path | None = None,
    iptables_flavour: str = "auto",
    proxy_cgroup: str | Path | None = None,
    inbound: str = "ebpf",
    problems_fn: Callable[[], Iterable[str]] | None = None,
    iptables_present: bool | None = None,
    bpffs_dir: str | Path | None = None,
) -> BackendChoice:
    """The backend for this node and why it was chosen. problems_fn overrides the eBPF probe and
    iptables_present the look for an iptables binary (tests).

    proxy_cgroup: the node proxy's cgroup v2 dir (ambient original-destination lookups happen there).
    bpffs_dir: where on the node's bpffs the eBPF backend keeps its pins (None: a bpffs of its own)."""
    if setting not in SETTINGS:
        raise BackendError(f"unknown backend {setting!r}: use one of {', '.join(SETTINGS)}")
    where = Path(state_dir) if state_dir is not None else DEFAULT_STATE_DIR
    if setting == "iptables":
        return BackendChoice(_iptables(iptables_flavour, where), "backend 'iptables' configured")
    if setting == "nftables":
        return BackendChoice(_nftables(), "backend 'nftables' configured")
    if problems_fn is None:
        problems: list[str] = ebpf_problems(where, background=setting == "auto")
    else:
        problems = list(problems_fn())
    if problems:
        why = "; ".join(problems)
        if setting == "ebpf":
            raise BackendError(f"backend 'ebpf' configured but eBPF cannot run on this node: {why}")
        if rules_backend_setting(iptables_present) == "nftables":
            reason = f"auto: eBPF unavailable ({why}) and no iptables binary; using nftables"
            log.warning(reason, extra={"event": "backend_selected", "backend": "nftables"})
            return BackendChoice(_nftables(), reason)
        reason = f"auto: eBPF unavailable ({why}); using iptables"
        log.warning(reason, extra={"event": "backend_selected", "backend": "iptables"})
        return BackendChoice(_iptables(iptables_flavour, where), reason)
    from node_agent.backends.ebpf.backend import EbpfBackend
    from node_agent.backends.iptables import rules_helper

    if inbound not in ("ebpf", "iptables"):
        raise BackendError(f"unknown inbound mode {inbound!r}: use 'ebpf' or 'iptables'")

    # inbound "ebpf": TC for sidecar pods, the rules backend for ambient pods (its CONNMARK + policy routing
    # bring the app's replies on the node proxy's original-source connections back to the proxy)
    inbound_rules = _iptables(iptables_flavour) if inbound == "iptables" else None
    ambient_rules: RedirectBackend | None = None
    if inbound_rules is None:
        ambient_rules = ambient_inbound_rules(iptables_flavour, iptables_present)
    backend = EbpfBackend(
        Path(state_dir) if state_dir is not None else DEFAULT_STATE_DIR,
        inbound_fallback=inbound_rules,
        proxy_cgroup=proxy_cgroup,
        toolchain_fallback=setting == "auto",
        ambient_inbound=ambient_rules,
        rules_helper=rules_helper.for_rules(ambient_rules),
        change_count=True,
        bpffs_dir=bpffs_dir,
    )
    ambient_in = ambient_rules.name if ambient_rules is not None else "iptables"
    how = "iptables" if ambient_rules is None else f"TC eBPF; ambient pods' inbound via {ambient_in}"
    reason = f"{setting}: eBPF available (outbound in eBPF, inbound via {how})"
    log.info(reason, extra={"event": "backend_selected", "backend": "ebpf", "ambient_inbound": ambient_in})
    return BackendChoice(backend, reason)
