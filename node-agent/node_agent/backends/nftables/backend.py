"""The nftables redirection backend: one `table inet headrace` per pod, applied in-process with libnftables.

Apply = one entry into the pod netns with one libnftables context (`libnft.session`): the ruleset read
(JSON: foreign base chains, and whether our table is there), our table swapped for the builder's in ONE
nftables transaction (both families; created outright in a fresh netns), then what the table needs beside
it over rtnetlink in the same thread (`pod_routing`: `::6` on `lo`, the TPROXY or ambient policy
routing; if that fails the old table is put back), then the ruleset generation and our table read back.
Nothing is spawned. The netns flock (`cni.kernel.netns_lock`) keeps the plugin's and the agent's writers
apart. Remove deletes the table and its policy routing the same way.

Drift check: list our table (in-process) and compare it with what this backend applied last (the listing
taken right after the apply), or, for a table it did not apply in this run (after a restart), with the
builder's canonical text; a missing, altered or extra chain or rule is drift, repaired by applying again.
A check first reads the netns' nf_tables ruleset generation (one netlink request, `nft_generation`): every
nf_tables commit in the netns bumps it and reads do not, so when it is the one recorded at the last apply
or verified listing, nothing in the netns changed and the listing is skipped. When it moved, the check
also reads the whole ruleset (JSON, in-process) for foreign base chains hooked at prerouting/output at or
before our nat chains' priority (`nft_foreign`, with only `inet headrace` as ours): drift too, and the
re-apply removes them in the same transaction that restores our table.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from cni.contract.kinds import Family
from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.kernel.iptables_run import IptablesError
from cni.kernel.netns_lock import netns_lock
from cni.kernel.nft_tables import restore_text
from cni.rules import nft_builder, nft_text
from cni.rules.nft_ambient import AM_MANGLE_PRERT
from cni.rules.nft_compare import compare
from cni.rules.sidecar import uses_tproxy
from node_agent.backends import nft_foreign
from node_agent.backends.base import BackendError, PodRules, PodTarget, RedirectSpec
from node_agent.backends.iptables.backend import check_ambient_routing, families_of
from node_agent.backends.iptables.nft_generation import NftGenerationError, read_here
from node_agent.backends.nft_table_dump import NftTableDumpError, tables_here
from node_agent.backends.nftables import fresh_write, libnft, pod_routing

TPROXY_CHAIN = "chain sc_tproxy {"
AMBIENT_CHAIN = f"chain {AM_MANGLE_PRERT} {{"  # an ambient table: it comes with the policy routing
log = logging.getLogger("headrace.backend.nftables")


def wanted_table(spec: RedirectSpec, families: tuple[int, ...]) -> nft_text.NftTable:
    if isinstance(spec, SidecarSpec):
        return nft_builder.sidecar_table(spec, families)
    if isinstance(spec, AmbientSpec):
        return nft_builder.ambient_table(spec, families)
    raise BackendError(f"unsupported redirect spec {type(spec).__name__}")


class NftablesBackend:
    """RedirectBackend on one nftables table (`inet headrace`) inside each pod's netns."""

    name = "nftables"
    needs_cgroup = False
    change_events = True  # every change to our table (or a foreign one) is an nf_tables commit

    def __init__(self) -> None:
        libnft.load()  # fail at selection time, not at the first pod
        self._lock = threading.Lock()
        # netns path → (the table text wanted, its verified listing, the netns' ruleset generation then)
        self._applied: dict[str, tuple[str, str, int | None]] = {}
        self._built: dict[tuple[RedirectSpec, tuple[int, ...]], tuple[nft_text.NftTable, str]] = {}
        # table text → how the kernel lists it: the same for every pod it goes into (our table alone, no
        # handles or counters), so one pod's read-back stands for the next ones'
        self._listings: dict[str, str] = {}

    # ------------------------------------------------------------------ apply / remove

    def apply(self, target: PodTarget, spec: RedirectSpec) -> None:
        self.apply_after(target, spec, None)

    def apply_after(self, target: PodTarget, spec: RedirectSpec, first: Callable[[], None] | None) -> None:
        """`apply`, with `first` run inside the pod netns (same thread, same entry) before anything else."""
        families = families_of(target.ips)
        try:
            table, text = self.wanted(spec, families)
        except ValueError as exc:
            raise BackendError(f"nftables rules for pod {target.namespace}/{target.name}: {exc}") from exc
        self._forget(target.netns_path)
        with self._lock:
            known = self._listings.get(text)
        try:
            with netns_lock(target.netns_path, "apply-nft"), libnft.session(target.netns_path) as nft:
                if first is not None:
                    first()
                listed, generation = self._apply_here(nft, target, spec, table, families, known)
        except IptablesError as exc:  # the lock: netns gone or busy
            raise BackendError(f"nftables apply for pod {target.namespace}/{target.name}: {exc}") from exc
        if listed is not None:
            with self._lock:
                self._applied[target.netns_path] = (text, listed, generation)
                self._listings.setdefault(text, listed)

    def _apply_here(
        self, nft: libnft.Session, target: PodTarget, spec: RedirectSpec, table: nft_text.NftTable,
        families: tuple[int, ...], known: str | None = None,
    ) -> tuple[str | None, int | None]:
        """Inside the pod netns: swap the table in, then its policy routing (the table put back when that
        fails); (the table as listed afterwards — `known`, this text's listing, without reading it back —
        the ruleset generation then)."""
        what = f"pod {target.namespace}/{target.name}"
        chains = _base_chains(nft)
        foreign = nft_foreign.ahead_of_redirect(chains, families, nft_foreign.nftables_owned)
        before = swap_here(nft, what, _removal(target, foreign), table,
                           any(nft_foreign.nftables_owned(c) for c in chains))
        if foreign:  # only the iptables backend's jumps: the pod moves from it (its chains come out after)
            moving = all(c.only_our_jumps() for c in foreign)
            log.log(logging.INFO if moving else logging.WARNING, "%s ahead of our redirect removed: %s",
                    "the iptables backend's chains" if moving else "foreign nftables chains",
                    "; ".join(c.describe() for c in foreign),
                    extra={"pod": target.name, "namespace": target.namespace, "uid": target.uid,
                           "netns": target.netns_path, "step": "nft-foreign"})
        try:
            pod_routing.add_here(spec, families, before is not None and TPROXY_CHAIN in before)
        except OSError as exc:
            nft.cmd(restore_text(before))
            raise BackendError(f"nftables apply for {what}: {exc}") from exc
        try:
            generation: int | None = read_here()
        except (NftGenerationError, OSError):
            generation = None  # the listing decides at the next check
        if known is not None and generation is not None:
            return known, generation  # the transaction went in whole: the table is what it lists as
        return libnft.listing_of(nft.cmd(nft_text.list_command())), generation

    def remove(self, target: PodTarget) -> None:
        self._remove(target, keep_routing=False)

    def remove_beside(self, target: PodTarget, new: PodRules) -> None:
        """`remove` once another backend holds the pod (StepsAside): the policy routing stays."""
        self._remove(target, keep_routing=True)

    def _remove(self, target: PodTarget, keep_routing: bool) -> None:
        self._forget(target.netns_path)
        if not target.netns_path or not os.path.exists(target.netns_path):
            return
        try:
            with netns_lock(target.netns_path, "remove-nft"), libnft.session(target.netns_path) as nft:
                before = libnft.listing_of(nft.cmd(nft_text.list_command()))
                if before is None:
                    return
                result = nft.cmd(nft_text.remove_text())
                if result.rc != 0:
                    raise BackendError(f"nftables remove refused: {result.error.strip()}")
                nft.close_in_background = True  # the table is gone: nobody waits for the context's free
                if not keep_routing:
                    pod_routing.remove_here(TPROXY_CHAIN in before, AMBIENT_CHAIN in before)
        except (IptablesError, OSError) as exc:
            if not os.path.exists(target.netns_path):
                return
            raise BackendError(f"nftables remove for pod {target.namespace}/{target.name}: {exc}") from exc

    # ------------------------------------------------------------------ reading

    def listing(self, target: PodTarget) -> str | None:
        (listed,) = libnft.run_in_netns(target.netns_path, [nft_text.list_command()])
        return libnft.listing_of(listed)

    def check(self, target: PodTarget, spec: RedirectSpec) -> list[str]:
        if not os.path.exists(target.netns_path):
            return [f"network namespace {target.netns_path} does not exist"]
        families = families_of(target.ips)
        try:
            table, text = self.wanted(spec, families)
        except ValueError as exc:
            raise BackendError(f"nftables rules for pod {target.namespace}/{target.name}: {exc}") from exc
        routing = pod_routing.routing_of(spec)
        # one pooled hop into the netns: the ruleset generation (read before the listing it vouches for)
        # and the policy routing
        generation, routing_problems = pod_routing.quick_read(target.netns_path, families, routing)
        with self._lock:
            applied = self._applied.get(target.netns_path)
        problems: list[str] = []
        if applied is not None and applied[0] == text and generation is not None and applied[2] == generation:
            pass  # nothing in the netns changed since the table was verified
        else:
            with libnft.session(target.netns_path) as nft:
                listed = libnft.listing_of(nft.cmd(nft_text.list_command()))
                chains = _base_chains(nft)
            if applied is None or applied[:2] != (text, listed):
                problems = compare(listed, table)
            problems += nft_foreign.problems_of(
                nft_foreign.ahead_of_redirect(chains, families, nft_foreign.nftables_owned))
            if not problems and listed is not None:
                with self._lock:
                    self._applied[target.netns_path] = (text, listed, generation)
        if routing_problems is None:  # the in-process read failed: ask `ip`
            routing_problems = _routing_problems_by_ip(target, spec, families)
        return problems + routing_problems

    def wanted(self, spec: RedirectSpec, families: tuple[int, ...]) -> tuple[nft_text.NftTable, str]:
        """The builder's table and its text, remembered per (spec, families): every check compares it."""
        key = (spec, families)
        with self._lock:
            known = self._built.get(key)
        if known is None:
            table = wanted_table(spec, families)
            known = (table, table.render())
            with self._lock:
                if len(self._built) >= 256:
                    self._built.clear()
                self._built[key] = known
        return known

    def installed(self, target: PodTarget) -> bool:
        if not os.path.exists(target.netns_path):
            return False
        return self.listing(target) is not None

    def _forget(self, netns_path: str) -> None:
        with self._lock:
            self._applied.pop(netns_path, None)

    # ------------------------------------------------------------------ node-level members

    def fallback_reason(self, spec: RedirectSpec) -> str | None:
        return None  # nftables implements every spec

    def set_proxy_cgroup(self, path: str | Path | None) -> None:
        """Nothing to do: nftables redirection needs no proxy cgroup."""

    def pinned_pods(self) -> list[str]:
        return []  # everything lives in the pod's netns

    def close(self) -> None:
        """Nothing held on the node."""


def swap_here(nft: libnft.Session, what: str, removal: str, table: nft_text.NftTable, ours: bool) -> str | None:
    """In the session's netns: our table before (None: none), then `table` in its place with the foreign
    chains' `removal`, as one transaction. Without a table of ours (`ours` False: a fresh netns) it is
    created: a transaction that deletes a table makes freeing the context wait for an RCU grace period
    (10-30 ms on a busy node), which a fresh pod need not pay. With no foreign chain to remove, the
    creating batch is built and sent in-process (`fresh_write`; libnftables when it declines)."""
    if not ours:
        declined = fresh_write.create_here(table) if not removal else "foreign chains to remove"
        if declined is None:
            return None
        if declined != fresh_write.EXISTS and nft.cmd(removal + nft_text.create_text(table)).rc == 0:
            return None  # else a table of ours is there after all: listed and replaced
    before = libnft.listing_of(nft.cmd(nft_text.list_command()))
    result = nft.cmd(removal + nft_text.replace_text(table))
    if result.rc != 0:
        raise BackendError(f"nftables transaction for {what} refused: {result.error.strip()}")
    nft.close_in_background = True  # the transaction deleted the old table
    return before


def _routing_problems_by_ip(target: PodTarget, spec: RedirectSpec, families: tuple[Family, ...]) -> list[str]:
    """The policy routing checked with `ip` (when the in-process read failed)."""
    if isinstance(spec, SidecarSpec) and uses_tproxy(spec):
        from cni.kernel.tproxy import check_tproxy_routes

        return check_tproxy_routes(target.netns_path, families)
    if isinstance(spec, AmbientSpec):
        return check_ambient_routing(target, families)
    return []


def _base_chains(nft: libnft.Session) -> list[nft_foreign.BaseChain]:
    """Every base chain in the netns (ours and foreign), from the JSON ruleset; none, without listing it,
    when the netns holds no table at all (a new pod's)."""
    try:
        if not tables_here():
            return []
    except NftTableDumpError:
        pass  # the listing decides
    result = nft.cmd("list ruleset", json=True)
    if result.rc != 0:
        raise BackendError(f"nft list ruleset failed: {result.error.strip()}")
    try:
        return nft_foreign.parse_ruleset(result.output)
    except nft_foreign.NftForeignError as exc:
        raise BackendError(str(exc)) from exc


def _removal(target: PodTarget, found: list[nft_foreign.BaseChain]) -> str:
    """The `nft` lines removing foreign chains (the start of the apply transaction)."""
    try:
        return nft_foreign.removal_script(found)
    except ValueError as exc:
        raise BackendError(f"foreign nftables chains for pod {target.namespace}/{target.name}: {exc}") from exc
