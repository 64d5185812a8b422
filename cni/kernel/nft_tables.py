"""Apply, check and remove the pod's nftables table with the `nft` binary (the plugin's standalone path).

Each write is ONE nf_tables transaction, so the pod's table is swapped for the new one, or nothing changes.
ADD of a REDIRECT-mode table into a netns without one first creates it from this process (`nft_fresh`:
the batch built in-process, sent from inside the netns, `::6` on `lo` over rtnetlink; no process at
all). Otherwise, or when that is declined, it runs `nsenter --net=PATH nft -f -` fed on stdin (argv
lists, no shell, started by `spawn`): first `create table` (one process, in parallel with the netns
set-up side jobs: `::6` on `lo` for IPv6, TPROXY policy routing); a netns that has our table already
gets a read and one replace transaction. When either side fails, the table is put back as it was
(deleted, or the old listing restored) and the side jobs are undone. Writers hold the netns flock
(netns_lock.py), as the iptables path does. The agent applies the same tables in-process with
libnftables (node_agent/backends/nftables/).

Stdlib only: imported by the CNI plugin for `backend: nftables`.
"""

from __future__ import annotations

import os

from cni.kernel import spawn
from cni.kernel.iptables_run import NOT_FOUND_EXIT, TIMEOUT, IptablesError, emit, netns_argv
from cni.kernel.netns_lock import netns_lock
from cni.kernel.side_jobs import SideJob, lo_passthrough_v6, run_with_side_jobs, undo_side_jobs
from cni.rules import nft_builder, nft_text

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Iterable

    from cni.contract.sidecar_params import SidecarParams
    from cni.contract.spec import SidecarSpec
    from cni.kernel.iptables_run import StepLog

NFT = "nft"
_ABSENT = "No such file or directory"
TPROXY_CHAIN = "chain sc_tproxy {"


class NftError(IptablesError):
    """An nft step failed; `step` names it and `stderr` carries nft's own words."""


def _result(step: str, proc: spawn.Result) -> NftError | None:
    if proc.returncode is None:
        return NftError(step, f"nft timed out after {TIMEOUT:.0f}s")
    if proc.returncode != 0:
        return NftError(step, f"nft exited {proc.returncode}", proc.stderr, missing=proc.returncode == NOT_FOUND_EXIT)
    return None


def _run(step: str, netns_path: str | None, args: list[str], stdin: str | None = None) -> spawn.Result:
    argv = netns_argv(netns_path, [NFT, *args])
    try:
        (proc,) = spawn.run_many([(argv, stdin)], TIMEOUT)
    except FileNotFoundError as exc:
        raise NftError(step, f"{argv[0]} not found", str(exc), missing=True) from exc
    except OSError as exc:
        raise NftError(step, f"{argv[0]} could not be started", str(exc)) from exc
    return proc


def transaction(netns_path: str | None, text: str, step: str) -> None:
    """Run one nft transaction (`nft -f -` with `text` on stdin); NftError if nft refused it."""
    err = _result(step, _run(step, netns_path, ["-f", "-"], text))
    if err is not None:
        raise err


def listing(netns_path: str | None, name: str = nft_text.POD_TABLE) -> str | None:
    """`nft list table inet <name>` in the netns; None when there is no such table."""
    proc = _run("list", netns_path, ["list", "table", nft_text.TABLE_FAMILY, name])
    if proc.returncode not in (0, NOT_FOUND_EXIT) and _ABSENT in proc.stderr:  # 127: nft itself is missing
        return None
    err = _result("list", proc)
    if err is not None:
        raise err
    return proc.stdout


def restore_text(before: str | None, name: str = nft_text.POD_TABLE) -> str:
    """The transaction that puts a table back as it was listed (None: there was none)."""
    if before is None:
        return nft_text.remove_text(name)
    return f"table {nft_text.TABLE_FAMILY} {name} {{}}\ndelete table {nft_text.TABLE_FAMILY} {name}\n{before}"


def sidecar_side_jobs(spec: SidecarSpec | SidecarParams, fams: tuple[int, ...]) -> list[SideJob]:
    from cni.rules.sidecar import uses_tproxy

    if uses_tproxy(spec):
        from cni.kernel.tproxy import TproxyRoutesJob  # TPROXY pods only

        return [TproxyRoutesJob(4 if f == 4 else 6) for f in fams]
    if 6 in fams:
        return [lo_passthrough_v6()]
    return []


def apply_sidecar(
    netns_path: str,
    spec: SidecarSpec | SidecarParams,
    families: Iterable[object],
    *,
    log: StepLog | None = None,
) -> None:
    """Install (or replace) the sidecar table in the pod netns, atomically, with its side jobs."""
    table = nft_builder.sidecar_table(spec, families)
    fams = nft_builder.pod_families(families)
    jobs = sidecar_side_jobs(spec, fams)
    step = "apply-sidecar-nft"
    if not os.path.exists(netns_path):
        raise NftError(step, f"network namespace {netns_path} does not exist")
    with netns_lock(netns_path, step):
        if not any(j.step.startswith("tproxy") for j in jobs):  # REDIRECT mode: no process if it can be
            from cni.kernel.nft_fresh import create_fresh

            declined = create_fresh(netns_path, table, 6 in fams, step)
            if declined is None:
                emit(log, "info", step, "nftables table applied", families=list(fams), way="in-process")
                return
            emit(log, "debug", step, "not created in-process, nft takes it", reason=declined)
        create = (netns_argv(netns_path, [NFT, "-f", "-"]), nft_text.create_text(table))
        procs, side_error = run_with_side_jobs(netns_path, [create], jobs)
        if not procs:
            assert side_error is not None
            raise side_error
        error: IptablesError | None = _result(step, procs[0])
        changed = error is None
        before: str | None = None
        if error is not None and side_error is None:
            try:
                before = listing(netns_path)
                if before is None:
                    raise error  # create failed for another reason than an existing table
                transaction(netns_path, nft_text.replace_text(table), step)
                error, changed = None, True
            except IptablesError as exc:
                error = exc
        if error is not None or side_error is not None:
            emit(log, "error", step, "nft apply failed, rolling back", error=str(error or side_error))
            if changed:
                try:
                    transaction(netns_path, restore_text(before), f"rollback-{step}")
                except IptablesError as rb_exc:
                    emit(log, "error", step, "rollback failed", error=str(rb_exc))
            undo_side_jobs(netns_path, jobs, step, log)
            raise side_error or error  # type: ignore[misc]
        if before is not None and TPROXY_CHAIN in before and not any(j.step.startswith("tproxy") for j in jobs):
            from cni.kernel.tproxy import remove_tproxy_routes  # TPROXY rules replaced by REDIRECT ones

            remove_tproxy_routes(netns_path, fams, log=log)
    emit(log, "info", step, "nftables table applied", families=list(fams))


def check_sidecar(netns_path: str, spec: SidecarSpec | SidecarParams, families: Iterable[object]) -> list[str]:
    """Problems with the pod's sidecar table (and, TPROXY mode, its policy routing); empty when intact."""
    from cni.rules.nft_compare import compare
    from cni.rules.sidecar import uses_tproxy

    if not os.path.exists(netns_path):
        return [f"network namespace {netns_path} does not exist"]
    table = nft_builder.sidecar_table(spec, families)
    try:
        problems = compare(listing(netns_path), table)
    except IptablesError as exc:
        return [f"cannot read the nftables table: {exc}"]
    if uses_tproxy(spec):
        from cni.kernel.tproxy import check_tproxy_routes

        problems.extend(check_tproxy_routes(netns_path, nft_builder.pod_families(families)))
    return problems


def remove(netns_path: str | None, *, log: StepLog | None = None) -> None:
    """Delete our table (and the TPROXY policy routing it came with). Idempotent; a gone netns is success."""
    if netns_path is not None and not os.path.exists(netns_path):
        return
    try:
        with netns_lock(netns_path, "remove-nft"):
            before = listing(netns_path)
            if before is None:
                return
            transaction(netns_path, nft_text.remove_text(), "remove-nft")
            if TPROXY_CHAIN in before:
                from cni.kernel.tproxy import remove_tproxy_routes

                remove_tproxy_routes(netns_path, (4, 6), log=log)
    except IptablesError:
        if netns_path is not None and not os.path.exists(netns_path):
            return
        raise
    emit(log, "info", "remove-nft", "nftables table removed")


def installed(netns_path: str | None) -> bool:
    if netns_path is not None and not os.path.exists(netns_path):
        return False
    return listing(netns_path) is not None
