"""The iptables redirection backend: cni.rules (builder + atomic in-netns apply) behind RedirectBackend.

One flavour (legacy or nft) per node, chosen once by the agent (`cni.kernel.flavour.resolve`) and used
for every pod. Address families come from the pod's IPs (both when unknown: harmless in a v4-only pod).

Drift checks first ask `iptc_check.DriftShortcut` for a cheap in-process answer: on legacy hosts a
python-iptables read of the pod's tables whose fingerprint matches the last verified one, on nft hosts
the netns' nf_tables ruleset generation unchanged since the last verified check (`nft_generation`).
Either answers "intact" without running anything; otherwise (and for checks that look beyond
iptables, e.g. sidecar TPROXY policy routing) the iptables-save compare decides. An ambient pod's policy
routing (original-source delivery) is read beside either answer, in-process over rtnetlink
(`node_agent.kernel.policy_routes_read`; `ip` if that fails). HEADRACE_IPTC_CHECK=0
in the agent's environment turns the shortcut off.

The compare also checks that traffic meets our jumps at all (cni.rules.compare: a rule ahead of our jump,
a policy other than ACCEPT); on nft hosts the full check also reads the netns' nf_tables ruleset for
foreign base chains hooked ahead of our nat chains (`nft_foreign`), which `apply` removes.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cni.contract.kinds import Family
from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.kernel import flavour as flavour_mod
from cni.kernel import tables as netns_tables
from cni.kernel.flavour import Flavour
from cni.kernel.iptables_run import IptablesError
from cni.kernel.netns import NetnsReturnError
from cni.rules import builder
from node_agent.backends import nft_foreign
from node_agent.backends.base import BackendError, PodRules, PodTarget, RedirectSpec
from node_agent.backends.env_switch import switched_on
from node_agent.backends.iptables import fresh_remove, nft_fresh_write
from node_agent.backends.iptables.iptc_check import STATS, DriftShortcut
from node_agent.backends.iptables.xt_changes import COUNT_ENV, QuietLegacyPods
from node_agent.kernel.netns_runner import staying_in

IPTC_ENV = "HEADRACE_IPTC_CHECK"
MAX_APPLIED = 16384
log = logging.getLogger("headrace.backend.iptables")


def in_process_check_enabled(environ: dict[str, str] | None = None) -> bool:
    """HEADRACE_IPTC_CHECK: unset or anything but 0/false/no/off turns the in-process check on."""
    return switched_on(IPTC_ENV, environ)


def families_of(ips: tuple[str, ...]) -> tuple[Family, ...]:
    """The address families of a pod's IPs; (4, 6) when none are known. Bad IPs raise BackendError."""
    return _families_of(tuple(ips))


@functools.lru_cache(maxsize=4096)
def _families_of(ips: tuple[str, ...]) -> tuple[Family, ...]:
    """(every apply and check of a pod asks: its IPs are parsed once)"""
    found: set[int] = set()
    for ip in ips:
        try:
            found.add(ipaddress.ip_interface(ip).version)
        except ValueError:
            raise BackendError(f"invalid pod IP {ip!r}") from None
    if not found:
        return (4, 6)
    out: list[Family] = []
    if 4 in found:
        out.append(4)
    if 6 in found:
        out.append(6)
    return tuple(out)


def iptables_only_check(spec: RedirectSpec) -> bool:
    """Whether the authoritative check of `spec` looks at iptables rules only, so that an unchanged
    fingerprint may stand in for it. Sidecar TPROXY mode also checks the policy routing (`ip rule`/`ip
    route`), which the fingerprint does not cover: those pods always get the full check."""
    return isinstance(spec, AmbientSpec) or not builder.uses_tproxy(spec)


def check_ambient_routing(target: PodTarget, families: tuple[Family, ...]) -> list[str]:
    """An ambient pod's original-source policy routing (any packet-filter backend): read in-process over
    rtnetlink (nothing spawned), or with `ip` when that read fails."""
    if not os.path.exists(target.netns_path):
        return []
    from cni.rules.tproxy_routes import AMBIENT
    from node_agent.kernel.policy_routes_read import PolicyRoutesReadError, check_routing

    try:
        return check_routing(target.netns_path, families, AMBIENT)
    except PolicyRoutesReadError:
        pass
    try:
        return netns_tables.check_ambient_routes(target.netns_path, families)
    except (ValueError, OSError) as exc:
        raise BackendError(f"policy routing check for pod {target.namespace}/{target.name}: {exc}") from exc


def _prefix(spec: RedirectSpec) -> str:
    """The chain prefix of `spec`'s rules."""
    if isinstance(spec, SidecarSpec):
        return builder.SIDECAR_PREFIX
    if isinstance(spec, AmbientSpec):
        return builder.AMBIENT_PREFIX
    raise BackendError(f"unsupported redirect spec {type(spec).__name__}")


class IptablesBackend:
    """RedirectBackend on iptables chains (HEADRACE_*) inside each pod's netns."""

    name = "iptables"
    needs_cgroup = False

    def __init__(self, flavour: str = "auto", *, in_process_check: bool | None = None,
                 change_count_dir: Path | None = None) -> None:
        """in_process_check: None = on unless HEADRACE_IPTC_CHECK says off (legacy: python-iptables
        fingerprint; nft: the ruleset generation). change_count_dir (the node's backend, on legacy hosts with
        the in-process check on): run the x_tables change count there (`xt_changes`; unless
        HEADRACE_XT_CHANGE_COUNT says off)."""
        try:
            self.flavour: Flavour = flavour_mod.resolve(flavour)
        except ValueError as exc:
            raise BackendError(str(exc)) from exc
        self.shortcut: DriftShortcut | None = None
        self.quiet: QuietLegacyPods | None = None  # legacy pods the drift poll may skip
        # netns path -> (spec, families) of this backend's last apply there (a removal's in-process way)
        self._applied: dict[str, tuple[RedirectSpec, tuple[Family, ...]]] = {}
        # iptables-nft writes through nf_tables (changes announced); legacy tables announce nothing: polled
        self.change_events = self.flavour == "nft"
        wanted = in_process_check_enabled() if in_process_check is None else in_process_check
        if self.flavour == "legacy" and wanted:  # python-iptables drives legacy tables only
            from node_agent.backends.iptables import iptc_reader
            from node_agent.backends.iptables.xt_digest import XtDigestReader

            iptc_reader.prepare_env()  # now, while the agent is still single-threaded
            self.shortcut = DriftShortcut(iptc_reader.shared_reader(), quick=XtDigestReader())
            if change_count_dir is not None and switched_on(COUNT_ENV):
                self.quiet = QuietLegacyPods(change_count_dir)
        elif self.flavour == "nft" and wanted:
            from node_agent.backends.iptables.nft_generation import NftGenerationReader

            self.shortcut = DriftShortcut(NftGenerationReader())

    def moved(self, old_path: str, new_path: str) -> None:
        """A pod's netns, applied at `old_path`, is pinned at `new_path`: what is known of it follows."""
        if self.shortcut is not None:
            self.shortcut.moved(old_path, new_path)
        applied = self._applied.pop(old_path, None)
        if applied is not None:
            self._applied[new_path] = applied

    def _forget(self, target: PodTarget) -> None:
        if self.shortcut is not None:
            self.shortcut.forget(target.netns_path)
        if self.quiet is not None:
            self.quiet.forget(target.uid)

    def adopt_written(self, target: PodTarget, spec: RedirectSpec, digest: bytes | None) -> None:
        """Another process (`rules_helper`) just applied `spec` for the pod: remembered as if applied here,
        with its verified fresh write's digest (None: none, the first check reads the rules back)."""
        self._forget(target)
        families = self._remember(target, spec)
        if digest is not None and self.shortcut is not None:
            self.shortcut.record_written(target.netns_path, spec, families, _prefix(spec), digest)

    def _remember(self, target: PodTarget, spec: RedirectSpec) -> tuple[Family, ...]:
        """The spec and families applied in the pod's netns (a later removal's in-process way); the families."""
        families = families_of(target.ips)
        if len(self._applied) >= MAX_APPLIED:  # pods whose removal never came here (netns gone)
            self._applied.clear()
        self._applied[target.netns_path] = (spec, families)
        return families

    def forget_applied(self, target: PodTarget) -> None:
        """Drop what this backend remembers of the pod's netns (the helper's, once it answered)."""
        self._applied.pop(target.netns_path, None)
        self._forget(target)

    def apply(self, target: PodTarget, spec: RedirectSpec) -> None:
        self._forget(target)
        with self.recorded_if_fresh(target, spec) as owned_only:
            try:
                self._apply(target, spec, owned_only)
            finally:
                self._forget(target)

    def apply_after(self, target: PodTarget, spec: RedirectSpec, first: Callable[[], None] | None) -> None:
        """`apply` with the calling thread inside the pod netns for all of it, `first` run there before
        (AppliesInNetns). A new pod's rules (and an ambient pod's policy routing) go in without a
        process, the agent's runner writing them itself (`in_process_commands`), and with this one entry
        its reads and writes in the netns need no hand-over to a pooled thread (`staying_in`)."""
        try:
            with staying_in(target.netns_path):
                if first is not None:
                    first()
                self.apply(target, spec)
        except NetnsReturnError:
            raise
        except OSError as exc:  # entering the netns
            raise BackendError(f"iptables apply for pod {target.namespace}/{target.name}: cannot enter "
                               f"{target.netns_path}: {exc.strerror or exc}") from exc

    @contextmanager
    def recorded_if_fresh(self, target: PodTarget, spec: RedirectSpec,
                          later: Callable[[Callable[[], None]], None] | None = None) -> Iterator[bool]:
        """Around an apply (nft hosts with the shortcut on, specs it covers): the netns' mark is read
        before and after; when every commit between them was a fresh in-process batch of the apply's own
        text (one per family, each into tables that did not exist: `nft_fresh_write`) and the netns holds
        no table but iptables-nft's and ours (so no foreign chain), the rules are exactly the spec's and
        are recorded as verified, so the pod's first drift check is a generation read instead of an
        iptables-save per family and a ruleset read. Nothing is recorded when the block raises. On every
        host the spec is remembered for the netns (a later removal's in-process way, `fresh_remove`).
        `later(fn)` (an ADD's: after its reply) takes what follows the block; a commit by anyone else
        meanwhile only means nothing is recorded. Yields whether the netns holds no table but iptables-nft's
        and ours, as read right after the first mark (so the block need not look for foreign chains; False:
        not read, or not so). Without `later` that read is the one the record relies on: only fresh
        batches of ours came after it. With `later` the tables are read after the block, off the reply's
        path."""
        covered = (self.flavour == "nft" and self.shortcut is not None
                   and isinstance(spec, (SidecarSpec, AmbientSpec)) and iptables_only_check(spec))
        before = nft_fresh_write.mark_of(target.netns_path) if covered else None
        owned_first = before is not None and later is None and nft_foreign.only_owned_tables(target.netns_path)
        yield owned_first

        def record() -> None:
            families = self._remember(target, spec)
            if before is None or self.shortcut is None:
                return
            # read before `after` (still so then); without `later`, after `before`: still so
            owned_only = owned_first if later is None else nft_foreign.only_owned_tables(target.netns_path)
            after = nft_fresh_write.mark_of(target.netns_path)
            if (after is None or not owned_only
                    or not nft_fresh_write.only_fresh_commits(before, after, len(families))):
                return
            self.shortcut.record_written(target.netns_path, spec, families, _prefix(spec),
                                         after.generation.to_bytes(4, "big"))

        if later is None:
            record()
        else:
            later(record)

    def _apply(self, target: PodTarget, spec: RedirectSpec, owned_only: bool = False) -> None:
        """owned_only: the netns was just found to hold no table but iptables-nft's and ours (no foreign
        chain to look for)."""
        families = families_of(target.ips)
        if not owned_only:
            self._remove_foreign(target, families)
        try:
            if isinstance(spec, SidecarSpec):
                netns_tables.apply_sidecar(target.netns_path, spec, families, self.flavour)
            elif isinstance(spec, AmbientSpec):  # a pod being enrolled mostly holds nothing of ours yet
                netns_tables.apply_ambient(target.netns_path, spec, families, self.flavour, optimistic=True)
            else:
                raise BackendError(f"unsupported redirect spec {type(spec).__name__}")
        except (IptablesError, ValueError, OSError) as exc:
            raise BackendError(f"iptables apply for pod {target.namespace}/{target.name}: {exc}") from exc

    def remove(self, target: PodTarget) -> None:
        applied = self._applied.pop(target.netns_path, None)
        written = self.shortcut.written(target.netns_path) if self.shortcut is not None else None
        self._forget(target)
        if applied is not None and fresh_remove.remove_fresh(target.netns_path, self.flavour, *applied,
                                                             written) is None:
            return  # still exactly the agent's own write: taken out in-process
        try:
            netns_tables.remove_all(target.netns_path, self.flavour)
        except (IptablesError, OSError) as exc:
            raise BackendError(f"iptables remove for pod {target.namespace}/{target.name}: {exc}") from exc
        finally:
            self._forget(target)

    def remove_beside(self, target: PodTarget, new: PodRules) -> None:
        """`remove` once another backend holds the pod (StepsAside): the policy routing stays."""
        self._applied.pop(target.netns_path, None)
        self._forget(target)
        try:
            netns_tables.remove_all(target.netns_path, self.flavour, keep_routing=True)
        except (IptablesError, OSError) as exc:
            raise BackendError(f"iptables remove for pod {target.namespace}/{target.name}: {exc}") from exc

    def announces_part(self, spec: RedirectSpec) -> bool:
        """An ambient pod's policy routing announces its changes (rtnetlink) on any host; on legacy hosts
        its x_tables rules do not (polled: `check_unannounced`). On nft hosts everything announces
        (`change_events`) and this is not asked (PartlyAnnounced)."""
        return isinstance(spec, AmbientSpec)

    def check_unannounced(self, target: PodTarget, spec: RedirectSpec) -> list[str]:
        """`check` without the ambient policy routing: the iptables rules only."""
        return self._check_rules(target, spec)

    def check_announced(self, target: PodTarget, spec: RedirectSpec) -> list[str]:
        """An ambient pod's policy routing (beside the iptables rules, never part of the fingerprint)."""
        return check_ambient_routing(target, families_of(target.ips)) if isinstance(spec, AmbientSpec) else []

    def check(self, target: PodTarget, spec: RedirectSpec) -> list[str]:
        return [*self._check_rules(target, spec), *self.check_announced(target, spec)]

    def _check_rules(self, target: PodTarget, spec: RedirectSpec) -> list[str]:
        problems = self._read_rules(target, spec)
        if not problems and target.netns_path not in self._applied:
            # rules this agent did not write (it restarted since): the removal's in-process way proves
            # the tables hold nothing but ours itself, so the spec they were found intact with is all it needs
            self._remember(target, spec)
        return problems

    def _read_rules(self, target: PodTarget, spec: RedirectSpec) -> list[str]:
        families = families_of(target.ips)
        prefix = _prefix(spec)
        if self.shortcut is None or not iptables_only_check(spec):
            STATS.count("iptables_save")
            return self._check_save(target, spec, families)
        count = self.quiet.read() if self.quiet is not None else None  # before anything is read
        problems: list[str] | None = None
        try:
            problems = self.shortcut.check(
                target.netns_path, spec, families, prefix, lambda: self._check_save(target, spec, families)
            )
            return problems
        finally:
            if self.quiet is not None:  # found intact: remembered at the count read before
                self.quiet.intact(target.uid, spec, count if problems == [] else None)

    def prepare(self) -> None:
        """Prepares: the x_tables change count's object starts compiling at the agent's start, not at the
        first poll (a first start on a node compiles it, seconds in a child)."""
        if self.quiet is not None:
            self.quiet.read()

    def unchanged(self, polls: Iterable[tuple[str, RedirectSpec, bool]]) -> set[str]:
        """QuietPolls (legacy hosts with the x_tables change count): the pods whose rules read as at their
        last intact read (`xt_changes`)."""
        return self.quiet.unchanged(polls) if self.quiet is not None else set()

    def _check_save(self, target: PodTarget, spec: RedirectSpec, families: tuple[Family, ...]) -> list[str]:
        """The authoritative check: iptables-save in the pod netns, compared with the builder's rules (and,
        on nft hosts, the foreign base chains ahead of ours)."""
        try:
            if isinstance(spec, SidecarSpec):
                problems = netns_tables.check_sidecar(target.netns_path, spec, families, self.flavour)
            elif isinstance(spec, AmbientSpec):
                problems = netns_tables.check_ambient(target.netns_path, spec, families, self.flavour)
            else:
                raise BackendError(f"unsupported redirect spec {type(spec).__name__}")
        except (IptablesError, ValueError, OSError) as exc:
            raise BackendError(f"iptables check for pod {target.namespace}/{target.name}: {exc}") from exc
        return problems + nft_foreign.problems_of(self._foreign(target, families))

    def _foreign(self, target: PodTarget, families: tuple[Family, ...]) -> list[nft_foreign.BaseChain]:
        """Foreign nftables base chains ahead of our nat chains (nft hosts; [] when nft cannot tell)."""
        if self.flavour != "nft" or not os.path.exists(target.netns_path):
            return []
        try:
            return nft_foreign.read(target.netns_path, families)
        except nft_foreign.NftForeignError as exc:
            log.warning("cannot read the pod's nftables ruleset: %s", exc,
                        extra={"uid": target.uid, "netns": target.netns_path, "step": "nft-foreign"})
            return []

    def _remove_foreign(self, target: PodTarget, families: tuple[Family, ...]) -> None:
        found = self._foreign(target, families)
        if not found:
            return
        try:
            nft_foreign.remove(target.netns_path, found)
        except (nft_foreign.NftForeignError, ValueError) as exc:
            raise BackendError(f"removing foreign nftables chains for pod {target.namespace}/{target.name}: "
                               f"{exc}") from exc
        log.warning("foreign nftables chains ahead of our redirect removed: %s",
                    "; ".join(c.describe() for c in found),
                    extra={"pod": target.name, "namespace": target.namespace, "uid": target.uid,
                           "netns": target.netns_path, "step": "nft-foreign"})

    def installed(self, target: PodTarget) -> bool:
        try:
            return netns_tables.installed(target.netns_path, self.flavour)
        except (IptablesError, OSError) as exc:
            raise BackendError(f"iptables read for pod {target.namespace}/{target.name}: {exc}") from exc

    def fallback_reason(self, spec: RedirectSpec) -> str | None:
        return None  # iptables implements every spec

    def set_proxy_cgroup(self, path: str | Path | None) -> None:
        """Nothing to do: iptables redirection needs no proxy cgroup."""

    def pinned_pods(self) -> list[str]:
        return []  # every rule lives in its pod's netns

    def close(self) -> None:
        """Nothing held on the node but the change count's programs, if any."""
        if self.quiet is not None:
            self.quiet.count.close()
