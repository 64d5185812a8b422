"""The nftables redirection backend: one `table inet headrace` per pod, applied in-process with libnftables.

Apply = read our table (if any) and swap it for the builder's in ONE nftables transaction (both families);
the netns flock (`cni.kernel.netns_lock`) keeps the plugin's and the agent's writers apart. A sidecar pod
also needs `::6` on `lo` (IPv6) or, in TPROXY mode, the policy routing: those run as the plugin's side jobs
(`ip`), and if they fail the old table is put back. An ambient pod gets the original-source policy routing
(`tproxy_routes.AMBIENT`, one `ip -batch` per family, the same as on iptables) after its table; if that
fails the old table is put back; it is removed with the table and read back in-process by the check.

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
from pathlib import Path

from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.kernel.iptables_run import IptablesError
from cni.kernel.netns_lock import netns_lock
from cni.rules import nft_builder, nft_text
from cni.rules.nft_ambient import AM_MANGLE_PRERT
from cni.rules.nft_compare import compare
from cni.rules.sidecar import uses_tproxy
from node_agent.backends import nft_foreign
from node_agent.backends.base import BackendError, PodTarget, RedirectSpec
from node_agent.backends.iptables.backend import check_ambient_routing, families_of
from node_agent.backends.iptables.nft_generation import NftGenerationError, read_generation
from node_agent.backends.nftables import libnft

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

    # ------------------------------------------------------------------ apply / remove

    def apply(self, target: PodTarget, spec: RedirectSpec) -> None:
        families = families_of(target.ips)
        try:
            table = wanted_table(spec, families)
        except ValueError as exc:
            raise BackendError(f"nftables rules for pod {target.namespace}/{target.name}: {exc}") from exc
        self._forget(target.netns_path)
        tproxy = isinstance(spec, SidecarSpec) and uses_tproxy(spec)
        try:
            with netns_lock(target.netns_path, "apply-nft"):
                foreign = self._foreign(target, families)
                before = self._swap(target, _removal(target, foreign) + nft_text.replace_text(table))
                if foreign:
                    log.warning("foreign nftables chains ahead of our redirect removed: %s",
                                "; ".join(c.describe() for c in foreign),
                                extra={"pod": target.name, "namespace": target.namespace, "uid": target.uid,
                                       "netns": target.netns_path, "step": "nft-foreign"})
                try:
                    self._side_jobs(target, spec, families, tproxy, before)
                except (IptablesError, OSError) as exc:
                    self._swap(target, _restore_text(before))
                    raise BackendError(f"nftables apply for pod {target.namespace}/{target.name}: {exc}") from exc
                generation = _generation(target.netns_path)
                (after,) = libnft.run_in_netns(target.netns_path, [nft_text.list_command()])
                listed = libnft.listing_of(after)
        except IptablesError as exc:  # the lock: netns gone or busy
            raise BackendError(f"nftables apply for pod {target.namespace}/{target.name}: {exc}") from exc
        if listed is not None:
            with self._lock:
                self._applied[target.netns_path] = (table.render(), listed, generation)

    def _swap(self, target: PodTarget, text: str) -> str | None:
        """Our table before, then `text` as one transaction (the caller holds the netns lock)."""
        listed, result = libnft.run_in_netns(target.netns_path, [nft_text.list_command(), text])
        before = libnft.listing_of(listed)
        if result.rc != 0:
            raise BackendError(
                f"nftables transaction for pod {target.namespace}/{target.name} refused: {result.error.strip()}"
            )
        return before

    def _side_jobs(
        self, target: PodTarget, spec: RedirectSpec, families: tuple[int, ...], tproxy: bool, before: str | None
    ) -> None:
        """Sidecar pods: `::6` on lo (IPv6) or the TPROXY policy routing; ambient pods: their policy routing;
        the routing of a TPROXY table replaced by something else is removed."""
        from cni.kernel import nft_tables

        if isinstance(spec, SidecarSpec):
            jobs = nft_tables.sidecar_side_jobs(spec, families)
            if jobs:
                from cni.kernel.side_jobs import run_with_side_jobs, undo_side_jobs

                _, err = run_with_side_jobs(target.netns_path, [], jobs)
                if err is not None:
                    undo_side_jobs(target.netns_path, jobs, "apply-nft", None)
                    raise err
        if isinstance(spec, AmbientSpec):
            from cni.kernel.apply import valid_families
            from cni.kernel.tproxy import add_routes
            from cni.rules.tproxy_routes import AMBIENT

            add_routes(target.netns_path, valid_families(families), AMBIENT)  # all families or none
        if before is not None and TPROXY_CHAIN in before and not tproxy:
            from cni.kernel.tproxy import remove_tproxy_routes

            remove_tproxy_routes(target.netns_path, (4, 6))

    def remove(self, target: PodTarget) -> None:
        self._forget(target.netns_path)
        if not target.netns_path or not os.path.exists(target.netns_path):
            return
        try:
            with netns_lock(target.netns_path, "remove-nft"):
                listed, result = libnft.run_in_netns(
                    target.netns_path, [nft_text.list_command(), nft_text.remove_text()]
                )
                before = libnft.listing_of(listed)
                if result.rc != 0:
                    raise BackendError(f"nftables remove refused: {result.error.strip()}")
                if before is not None and TPROXY_CHAIN in before:
                    from cni.kernel.tproxy import remove_tproxy_routes

                    remove_tproxy_routes(target.netns_path, (4, 6))
                if before is not None and AMBIENT_CHAIN in before:
                    from cni.kernel.tproxy import remove_routes
                    from cni.rules.tproxy_routes import AMBIENT

                    remove_routes(target.netns_path, (4, 6), AMBIENT)
        except (IptablesError, OSError) as exc:
            if not os.path.exists(target.netns_path):
                return
            raise BackendError(f"nftables remove for pod {target.namespace}/{target.name}: {exc}") from exc

    # ------------------------------------------------------------------ reading

    def _foreign(self, target: PodTarget, families: tuple[int, ...]) -> list[nft_foreign.BaseChain]:
        """Foreign base chains ahead of our nat chains in the pod netns (`nft_foreign`)."""
        (result,) = libnft.run_in_netns(target.netns_path, ["list ruleset"], json=True)
        if result.rc != 0:
            raise BackendError(f"nft list ruleset failed: {result.error.strip()}")
        try:
            chains = nft_foreign.parse_ruleset(result.output)
        except nft_foreign.NftForeignError as exc:
            raise BackendError(str(exc)) from exc
        return nft_foreign.ahead_of_redirect(chains, families, nft_foreign.nftables_owned)

    def listing(self, target: PodTarget) -> str | None:
        (listed,) = libnft.run_in_netns(target.netns_path, [nft_text.list_command()])
        return libnft.listing_of(listed)

    def check(self, target: PodTarget, spec: RedirectSpec) -> list[str]:
        if not os.path.exists(target.netns_path):
            return [f"network namespace {target.netns_path} does not exist"]
        families = families_of(target.ips)
        try:
            table = wanted_table(spec, families)
        except ValueError as exc:
            raise BackendError(f"nftables rules for pod {target.namespace}/{target.name}: {exc}") from exc
        text = table.render()
        generation = _generation(target.netns_path)  # read before the listing it vouches for
        with self._lock:
            applied = self._applied.get(target.netns_path)
        problems: list[str] = []
        if applied is not None and applied[0] == text and generation is not None and applied[2] == generation:
            pass  # nothing in the netns changed since the table was verified
        else:
            listed = self.listing(target)
            if applied is None or applied[:2] != (text, listed):
                problems = compare(listed, table)
            problems += nft_foreign.problems_of(self._foreign(target, families))
            if not problems and listed is not None:
                with self._lock:
                    self._applied[target.netns_path] = (text, listed, generation)
        if isinstance(spec, SidecarSpec) and uses_tproxy(spec):
            from cni.kernel.tproxy import check_tproxy_routes

            problems.extend(check_tproxy_routes(target.netns_path, families))
        if isinstance(spec, AmbientSpec):
            problems.extend(check_ambient_routing(target, families))
        return problems

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


def _generation(netns_path: str) -> int | None:
    """The netns' nf_tables ruleset generation; None when it cannot be read (then the listing decides)."""
    try:
        return read_generation(netns_path)
    except NftGenerationError:
        return None


def _removal(target: PodTarget, found: list[nft_foreign.BaseChain]) -> str:
    """The `nft` lines removing foreign chains (the start of the apply transaction)."""
    try:
        return nft_foreign.removal_script(found)
    except ValueError as exc:
        raise BackendError(f"foreign nftables chains for pod {target.namespace}/{target.name}: {exc}") from exc


def _restore_text(before: str | None) -> str:
    from cni.kernel.nft_tables import restore_text

    return restore_text(before)
