"""A sidecar pod's rules put into a fresh pod netns at the plugin's ADD, by the agent, with as little work
as the backend allows (the ADD waits for it):

- nftables, REDIRECT mode: libnftables in the pod netns creates the builder's table in one transaction
  (`_swap_in`; a table already there, e.g. an ADD the kubelet retries, is listed and replaced); with
  IPv6, `::6` goes on `lo` over rtnetlink in-process
  (`node_agent.kernel.loopback_address`); if that fails, the table that was there before is put back.
  No process is started. The same table the plugin's `nft -f` path writes (`nft_builder`), so the drift
  check and the plugin's DEL treat it alike;
- iptables: the plugin's optimistic apply (`cni.kernel.tables.apply_sidecar`, one iptables-restore per
  family into a fresh netns, `::6` in parallel, rollback of every family on failure), from the warm agent;
- anything else (nftables in TPROXY mode, eBPF): the backend's own `apply`.

The netns flock (`cni.kernel.netns_lock`) keeps this apart from the plugin's writers and the drift repair.
Raises BackendError.
"""

from __future__ import annotations

from cni.contract.spec import SidecarSpec
from cni.kernel import tables as netns_tables
from cni.kernel.iptables_run import IptablesError
from cni.kernel.netns import NetnsReturnError, entered
from cni.kernel.netns_lock import netns_lock
from cni.rules import nft_text
from cni.rules.nft_text import NftTable
from cni.rules.rule_text import PASSTHROUGH_SOURCE
from cni.rules.sidecar import uses_tproxy
from node_agent.backends.base import BackendError, PodTarget, RedirectBackend
from node_agent.backends.iptables.backend import IptablesBackend, families_of
from node_agent.backends.nftables import libnft
from node_agent.backends.nftables.backend import NftablesBackend, wanted_table
from node_agent.kernel.loopback_address import replace_on_loopback

STEP = "agent-add-sidecar"


def apply_for_add(backend: RedirectBackend, target: PodTarget, spec: SidecarSpec) -> None:
    if isinstance(backend, NftablesBackend) and not uses_tproxy(spec):
        return _nftables(target, spec)
    if isinstance(backend, IptablesBackend):
        try:
            netns_tables.apply_sidecar(target.netns_path, spec, families_of(target.ips), backend.flavour,
                                       optimistic=True)
        except (IptablesError, ValueError, OSError) as exc:
            raise BackendError(f"iptables apply for pod {target.namespace}/{target.name}: {exc}") from exc
        return None
    return backend.apply(target, spec)


def _restore_text(before: str | None) -> str:
    """Our table as it was (None: absent), as one transaction."""
    if before is None:
        return nft_text.remove_text()
    return nft_text.remove_text() + before


def _swap_in(target: PodTarget, table: NftTable, what: str) -> str | None:
    """Our table into the netns; the one that was there before (None: none). A fresh netns has none: the
    table is created (`create_text`). Only when one is there (a retried ADD) is it listed and replaced:
    a transaction that deletes a table makes freeing its libnftables context wait for an RCU grace period
    (10-30 ms on a busy node), which a fresh pod's ADD must not pay."""
    (created,) = libnft.run_in_netns(target.netns_path, [nft_text.create_text(table)])
    if created.rc == 0:
        return None
    listed, replaced = libnft.run_in_netns(target.netns_path, [nft_text.list_command(), nft_text.replace_text(table)])
    if replaced.rc != 0:
        raise BackendError(f"nftables transaction for {what} refused: {(replaced.error or created.error).strip()}")
    return libnft.listing_of(listed)


def _nftables(target: PodTarget, spec: SidecarSpec) -> None:
    families = families_of(target.ips)
    try:
        table = wanted_table(spec, families)
    except ValueError as exc:
        raise BackendError(f"nftables rules for pod {target.namespace}/{target.name}: {exc}") from exc
    what = f"pod {target.namespace}/{target.name}"
    try:
        with netns_lock(target.netns_path, STEP):
            before = _swap_in(target, table, what)
            if 6 not in families:
                return
            try:
                with entered(target.netns_path):
                    replace_on_loopback(PASSTHROUGH_SOURCE[6].split("/")[0])
            except NetnsReturnError:
                raise
            except OSError as exc:
                libnft.run_in_netns(target.netns_path, [_restore_text(before)])
                raise BackendError(f"nftables apply for {what}: {exc}") from exc
    except IptablesError as exc:  # the lock: netns gone or busy
        raise BackendError(f"nftables apply for {what}: {exc}") from exc
