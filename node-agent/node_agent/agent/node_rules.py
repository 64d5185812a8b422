"""The node-side probe SNAT in the agent's own netns (the kubelet's TCP to enrolled ambient pods' IPs, SNATed
to the probe address the pods' rules let through): one kind per node, and what an agent of another kind
left there cleared.

The kind follows the node's backend and iptables flavour: nftables (`table inet headrace_node`, on the
nftables backend or a host without iptables) or iptables of the node's flavour (HEADRACE_POSTROUTING in
the nat table). An agent restarted with another backend or flavour would otherwise leave the old kind's
chain or table on the host for good, SNATing the pod IPs it last knew (`clear_others`, once at start).
An agent whose DaemonSet is deleted takes out every kind (`clear_all`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from cni.kernel import tables as kernel_tables
from cni.kernel.executables import on_path
from cni.kernel.flavour import FLAVOURS, Flavour, binary, legacy_tables_present
from cni.kernel.iptables_run import IptablesError
from node_agent.backends.base import BackendError
from node_agent.backends.full_reads import FULL_EVERY

log = logging.getLogger("headrace.agent.node_rules")

NFTABLES = "nftables"
KINDS = (NFTABLES, *(f"iptables-{f}" for f in FLAVOURS))


def kind(nftables: bool, flavour: str) -> str:
    """The node's kind: nftables, else iptables of `flavour`."""
    return NFTABLES if nftables else f"iptables-{flavour}"


def make(kind_: str) -> Callable[[list[str]], None]:
    """sync(ips): the node's probe SNAT for exactly these pod IPs, checked and rewritten only when it
    differs (logged: at start, as the pod IPs change, and when something else changed it)."""
    if kind_ == NFTABLES:
        from node_agent.backends.nftables.node_probe import sync_node_probe

        def sync_table(ips: list[str]) -> None:
            if sync_node_probe(ips):
                _written(kind_, ips, "the table differed")

        return sync_table
    flavour = _flavour(kind_)

    def sync(ips: list[str]) -> None:
        if problems := kernel_tables.check_node_probe_rules(None, ips, flavour):
            kernel_tables.sync_node_probe_rules(None, ips, flavour)
            _written(kind_, ips, problems[0])

    return sync


def _written(kind_: str, ips: list[str], why: str) -> None:
    log.info("node probe SNAT written (%s; %d pod IPs): %s", kind_, len(ips), why[:200],
             extra={"step": "node-rules"})


def unless_unchanged(sync: Callable[[list[str]], None], count: Callable[[], int | None],
                     clock: Callable[[], float] = time.monotonic) -> Callable[[list[str]], None]:
    """`sync` on a legacy host, not run while the node's x_tables change count (`xt_changes`) stands where
    it was when the last sync of the same IPs found or made the rules right (its iptables-save of the
    host's tables, with kube-proxy's rules in them, is the costliest read a pass can make); run at least
    every FULL_EVERY seconds (a change no tracepoint saw)."""
    last: tuple[int | None, list[str], float] | None = None  # the count, the IPs, when

    def guarded(ips: list[str]) -> None:
        nonlocal last
        now = count()  # before the read
        if now is not None and last is not None and last[:2] == (now, ips) and clock() - last[2] < FULL_EVERY:
            return
        sync(ips)
        last = (now, list(ips), clock())

    return guarded


def announced(kind_: str) -> bool:
    """Whether changes to this kind are announced (nf_tables: nftables and iptables-nft; legacy is polled)."""
    return kind_ != "iptables-legacy"


def _flavour(kind_: str) -> Flavour:
    flavour = kind_.removeprefix("iptables-")
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown node rules kind {kind_!r}")
    return flavour


def _nft_chain_present() -> bool:
    """Whether iptables-nft holds our nat chain in this netns (read in-process with libnftables; True when
    that cannot tell, so that iptables-nft-save looks)."""
    from cni.rules.node_probe import NODE_CHAIN
    from node_agent.backends.nftables import libnft

    try:
        listed = libnft.run_in_netns(None, [f"list chain {fam} nat {NODE_CHAIN}" for fam in ("ip", "ip6")])
        return any(libnft.listing_of(r) is not None for r in listed)
    except BackendError:
        return True


def _clear(other: str) -> bool:
    """Remove `other`'s probe SNAT from this netns; whether there was some. Raises BackendError/OSError."""
    if other == NFTABLES:
        from node_agent.backends.nftables import libnft
        from node_agent.backends.nftables.node_probe import sync_node_probe

        libnft.load()  # BackendError without libnftables: then no table of ours can be there either
        return sync_node_probe([])
    flavour = _flavour(other)
    if not on_path(binary(flavour, 4, "save")):
        return False
    if not (legacy_tables_present() if flavour == "legacy" else _nft_chain_present()):
        return False  # nothing of ours (the usual case): no process started
    if not kernel_tables.check_node_probe_rules(None, [], flavour):
        return False
    kernel_tables.sync_node_probe_rules(None, [], flavour)
    return True


def clear_others(kind_: str) -> list[str]:
    """Take out the probe SNAT of every kind but `kind_` (left by an agent with another backend or iptables
    flavour); the kinds that had some. Failures are logged, not raised: the node's own kind works
    regardless."""
    cleared = _clear_kinds([k for k in KINDS if k != kind_], "left by an agent of that kind")
    log.debug("node probe SNAT of other kinds checked", extra={"step": "node-rules", "cleared": cleared})
    return cleared


def clear_all() -> list[str]:
    """The agent leaves the node for good (its DaemonSet deleted): the probe SNAT of every kind taken out;
    the kinds that had some."""
    return _clear_kinds(list(KINDS), "the agent leaves the node")


def _clear_kinds(kinds: list[str], why: str) -> list[str]:
    cleared: list[str] = []
    for other in kinds:
        try:
            if _clear(other):
                cleared.append(other)
                log.info("node probe SNAT of the %s kind removed (%s)", other, why,
                         extra={"step": "node-rules", "kind": other})
        except (BackendError, IptablesError, OSError, ValueError) as exc:
            log.info("node probe SNAT of the %s kind not checked: %s", other,
                     exc, extra={"step": "node-rules", "kind": other})
    return cleared
