"""A sidecar pod's rules put into a fresh pod netns at the plugin's ADD, by the agent, with as little work
as the backend allows (the ADD waits for it):

- nftables, REDIRECT mode: one libnftables context in the pod netns creates the builder's table in one
  transaction (`nftables.backend.swap_here`; a table already there, e.g. an ADD the kubelet retries, is
  listed and replaced); with IPv6, `::6` goes on `lo` over rtnetlink in-process from the same thread
  (`nftables.pod_routing`); if that fails, the table that was there before is put back.
  No process is started. The same table the plugin's `nft -f` path writes (`nft_builder`), so the drift
  check and the plugin's DEL treat it alike;
- iptables: the plugin's optimistic apply (`cni.kernel.tables.apply_sidecar`, one iptables-restore per
  family into a fresh netns, `::6` in parallel, rollback of every family on failure), from the warm agent,
  whose runner writes a fresh text itself (`in_process_commands`), from this thread inside the pod netns
  (`staying_in`: no hand-over to a pooled thread); on nft hosts, rules it wrote itself into a netns
  nobody else changed meanwhile are recorded as verified (`IptablesBackend.recorded_if_fresh`), so the
  held pod's first drift check needs no `iptables-nft-save`;
- anything else (nftables in TPROXY mode, eBPF): the backend's own `apply`.

The netns flock (`cni.kernel.netns_lock`) keeps this apart from the plugin's writers and the drift repair.
Raises BackendError.
"""

from __future__ import annotations

from cni.contract.spec import SidecarSpec
from cni.kernel import tables as netns_tables
from cni.kernel.iptables_run import IptablesError
from cni.kernel.netns import NetnsReturnError
from cni.kernel.netns_lock import netns_lock
from cni.kernel.nft_tables import restore_text
from cni.rules.sidecar import uses_tproxy
from node_agent.backends.base import BackendError, PodTarget, RedirectBackend
from node_agent.backends.iptables.backend import IptablesBackend, families_of
from node_agent.backends.nftables import libnft, pod_routing
from node_agent.backends.nftables.backend import NftablesBackend, swap_here
from node_agent.kernel.netns_runner import staying_in
from node_agent.serve.add_request import Later, at_once

STEP = "agent-add-sidecar"


def apply_for_add(backend: RedirectBackend, target: PodTarget, spec: SidecarSpec, later: Later = at_once) -> None:
    """`later(fn)` takes the bookkeeping that can follow the ADD's reply."""
    if isinstance(backend, NftablesBackend) and not uses_tproxy(spec):
        return _nftables(backend, target, spec)
    if isinstance(backend, IptablesBackend):
        try:
            # the runner's commands then run right here, no hand-over
            with staying_in(target.netns_path), backend.recorded_if_fresh(target, spec, later):
                netns_tables.apply_sidecar(target.netns_path, spec, families_of(target.ips), backend.flavour,
                                           optimistic=True)
        except NetnsReturnError:
            raise
        except (IptablesError, ValueError, OSError) as exc:
            raise BackendError(f"iptables apply for pod {target.namespace}/{target.name}: {exc}") from exc
        return None
    return backend.apply(target, spec)


def _nftables(backend: NftablesBackend, target: PodTarget, spec: SidecarSpec) -> None:
    families = families_of(target.ips)
    try:
        table, _ = backend.wanted(spec, families)  # built once per spec and families
    except ValueError as exc:
        raise BackendError(f"nftables rules for pod {target.namespace}/{target.name}: {exc}") from exc
    what = f"pod {target.namespace}/{target.name}"
    try:
        with netns_lock(target.netns_path, STEP), libnft.session(target.netns_path) as nft:
            before = swap_here(nft, what, "", table, ours=False)
            try:
                pod_routing.add_here(spec, families, replaced_tproxy=False)  # REDIRECT: `::6` on lo (IPv6)
            except OSError as exc:
                nft.cmd(restore_text(before))
                raise BackendError(f"nftables apply for {what}: {exc}") from exc
    except IptablesError as exc:  # the lock: netns gone or busy
        raise BackendError(f"nftables apply for {what}: {exc}") from exc
