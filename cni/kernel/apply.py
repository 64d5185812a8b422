"""Apply a family's rulesets atomically: optimistic fresh restore, save → transition → restore, one
retry, and rollback of every family (and side job) when one fails; CHECK against a ruleset.

The caller holds `netns_lock`. Stdlib only: the CNI plugin applies sidecar rules through this.
"""

from __future__ import annotations

import os

from cni.kernel.executables import on_path
from cni.kernel.iptables_run import IptablesError, emit, restore, restore_argv, restore_many, save, save_families
from cni.kernel.side_jobs import LO_PASSTHROUGH_V6, restore_many_with, save_with, undo_side_jobs
from cni.rules.saved import owned_all, parse_save
from cni.rules.transition import desired_from_ruleset, fresh_text, transition

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from cni.contract.kinds import Family
    from cni.kernel.flavour import Flavour
    from cni.kernel.iptables_run import StepLog
    from cni.kernel.side_jobs import SideJob
    from cni.rules.builder import RuleSet
    from cni.rules.saved import Owned


def valid_families(families: Iterable[object]) -> tuple[Family, ...]:
    out: list[Family] = []
    for f in families:
        if f == 4 and 4 not in out:
            out.append(4)
        elif f == 6 and 6 not in out:
            out.append(6)
        elif f not in (4, 6):
            raise ValueError(f"address family must be 4 or 6, not {f!r}")
    if not out:
        raise ValueError("at least one address family is required")
    return tuple(out)


def require_netns(netns_path: str | None, step: str) -> None:
    if netns_path is not None and not os.path.exists(netns_path):
        raise IptablesError(step, f"network namespace {netns_path} does not exist")


def set_owned(
    netns_path: str | None,
    flavour: Flavour,
    family: Family,
    desired: dict[str, Owned],
    prefix: str,
    step: str,
    saved: str | None = None,
    attempts: int = 2,
) -> None:
    """Make our part of one family equal `desired` in one restore; on failure retry after a fresh save
    (the rules may have changed between save and restore). `saved`: a dump just taken (first attempt)."""
    for attempt in range(1, attempts + 1):
        text_now = saved if attempt == 1 and saved is not None else save(netns_path, flavour, family)
        text = transition(parse_save(text_now), desired, prefix)
        if not text:
            return
        try:
            restore(netns_path, flavour, family, text, step)
            return
        except IptablesError:
            if attempt == attempts:
                raise


def apply_rulesets(
    netns_path: str | None,
    rulesets: Sequence[RuleSet],
    flavour: Flavour,
    prefix: str,
    step: str,
    log: StepLog | None,
    *,
    optimistic: bool = False,
    side_jobs: Sequence[SideJob] = (),
    fresh_here: bool = False,
) -> dict[Family, dict[str, Owned]]:
    """Apply `rulesets` (the caller holds `netns_lock`); returns our part of each family before the apply
    (table → Owned; empty: nothing of ours was there).

    `optimistic`: first try `fresh_text` for every family at once (one restore each, no save: the
    common case of an ADD into a new netns); the families it refuses (our chains exist already) take the
    save → transition → restore path. `side_jobs`: commands run in the netns in parallel with the first
    stage; if one fails, whatever went in is rolled back (iptables, and what the other side jobs undo)
    and its error raised; if iptables fails, the side jobs' effects are undone too (`SideJob.undo`).
    `fresh_here` (the plugin, optimistic, iptables-nft): the fresh texts go in from this process first
    (`nft_fresh.create_fresh_xt`, side jobs ::6 on lo at most); what it declines takes the processes."""
    families = [rs.family for rs in rulesets]
    desired = {rs.family: desired_from_ruleset(rs) for rs in rulesets}
    before: dict[Family, dict[str, Owned]] = {}
    texts: dict[Family, str] = {}
    results: dict[Family, IptablesError | None] = {}
    side_error: IptablesError | None = None
    pending = list(families)
    ran: Sequence[SideJob] = side_jobs
    if optimistic:
        fresh = {fam: fresh_text(desired[fam]) for fam in families}
        todo = {f: t for f, t in fresh.items() if t}
        if fresh_here and _created_here(netns_path, flavour, todo, side_jobs, step, log):
            emit(log, "info", step, "iptables rules applied", families=list(families), flavour=flavour,
                 way="in-process")
            return {fam: {} for fam in families}
        results, side_error = restore_many_with(netns_path, flavour, todo, step, side_jobs)
        ran, side_jobs = side_jobs, ()  # they ran (or could not start: side_error says so)
        if side_error is not None and not results:
            pending = []  # the batch did not start: nothing changed
        else:
            pending = [fam for fam in families if results.get(fam) is not None]
            for fam in families:
                if fam not in pending:
                    before[fam], texts[fam] = {}, fresh[fam]  # nothing of ours was there: -N succeeded
            results = {fam: None for fam in families if fam not in pending}
        if pending and side_error is None:
            emit(log, "debug", step, "our chains exist already: replacing them", families=pending)
    if pending and side_error is None:
        saved, side_error = save_with(netns_path, flavour, pending, side_jobs)
        for fam in pending if side_error is None else ():
            before[fam] = owned_all(parse_save(saved[fam]), prefix)
            texts[fam] = transition(parse_save(saved[fam]), desired[fam], prefix, skip_unchanged=True)
        if side_error is None:
            results.update(restore_many(netns_path, flavour, {f: texts[f] for f in pending if texts[f]}, step))
            for fam in pending:
                if results.get(fam) is None:
                    continue
                # The rules may have changed between save and restore: one retry from a fresh save.
                err = results[fam]
                emit(log, "warning", step, "iptables restore failed, retrying", family=fam, error=str(err))
                try:
                    set_owned(netns_path, flavour, fam, desired[fam], prefix, f"{step}-v{fam}", attempts=1)
                    results[fam] = None
                except IptablesError as exc:
                    results[fam] = exc
    failed = [(fam, err) for fam, err in results.items() if err is not None]
    if failed or side_error is not None:
        for fam, err in failed:
            emit(log, "error", step, "iptables restore failed, rolling back", family=fam, error=str(err))
        if side_error is not None:
            emit(log, "error", step, "setting up the netns failed, rolling back", error=str(side_error))
        for fam in families:
            if texts.get(fam) and fam in results and results[fam] is None:
                try:
                    set_owned(netns_path, flavour, fam, before[fam], prefix, f"rollback-v{fam}")
                except IptablesError as rb_exc:
                    emit(log, "error", step, "rollback failed", family=fam, error=str(rb_exc))
        undo_side_jobs(netns_path, ran, step, log)
        if side_error is not None:
            raise side_error
        raise failed[0][1]
    emit(log, "info", step, "iptables rules applied", families=list(families), flavour=flavour)
    return before


def _created_here(netns_path: str | None, flavour: Flavour, texts: dict[Family, str],
                  side_jobs: Sequence[SideJob], step: str, log: StepLog | None) -> bool:
    """Whether the fresh texts (and ::6 on lo) went in from this process; False: nothing changed. Only
    where iptables-nft-restore is installed: a retry, CHECK and DEL need the tools anyway."""
    lo = [job for job in side_jobs if tuple(job.argv) == LO_PASSTHROUGH_V6]
    if flavour != "nft" or netns_path is None or not texts or len(lo) != len(side_jobs):
        return False
    if not all(on_path(restore_argv(flavour, family)[0]) for family in texts):
        return False
    from cni.kernel.nft_fresh import create_fresh_xt

    declined = create_fresh_xt(netns_path, texts, bool(lo), step)
    if declined is not None:
        emit(log, "debug", step, "not created in-process, iptables-nft-restore takes it", reason=declined)
    return declined is None


def check_rulesets(netns_path: str | None, rulesets: Sequence[RuleSet], flavour: Flavour) -> list[str]:
    """Problems (missing, altered, duplicated or extra rules of ours); empty when intact."""
    from cni.rules.compare import compare  # CHECK only: ADDs do not load it
    if netns_path is not None and not os.path.exists(netns_path):
        return [f"network namespace {netns_path} does not exist"]
    try:
        saved = save_families(netns_path, flavour, [rs.family for rs in rulesets])
    except IptablesError as exc:
        return [f"cannot read rules: {exc}"]
    problems: list[str] = []
    for rs in rulesets:
        problems.extend(compare(parse_save(saved[rs.family]), rs))
    return problems
