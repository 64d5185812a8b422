"""Side jobs: commands run in the netns in the same batch of processes as an apply's first iptables step
(the ::6 address on lo, TPROXY policy routing), and undone when the apply is rolled back."""

from __future__ import annotations

from cni.kernel import spawn
from cni.kernel.iptables_run import (
    TIMEOUT,
    IptablesError,
    emit,
    netns_argv,
    restore_argv,
    restore_many,
    restore_result,
    save_argv,
    save_families,
    save_results,
)
from cni.rules.rule_text import PASSTHROUGH_SOURCE

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Sequence

    from cni.contract.kinds import Family
    from cni.kernel.flavour import Flavour
    from cni.kernel.iptables_run import StepLog


class SideJob:
    """A command run in the netns (argv without the nsenter wrapper; `stdin` fed to it) together with the
    first iptables stage of an apply. `done` once it succeeded; `undo` gives what takes its effect back
    when the apply is rolled back (None: nothing to undo, e.g. the ::6 address on lo)."""

    __slots__ = ("argv", "done", "stdin", "step")

    def __init__(self, step: str, argv: list[str], stdin: str | None = None) -> None:
        self.step = step
        self.argv = argv
        self.stdin = stdin
        self.done = False

    def error(self, proc: spawn.Result) -> IptablesError | None:
        if proc.returncode is None:
            return IptablesError(self.step, f"{self.argv[0]} timed out after {TIMEOUT:.0f}s")
        why = self._failure(proc)
        if why is not None:
            return IptablesError(self.step, why, proc.stderr)
        self.done = True
        return None

    def _failure(self, proc: spawn.Result) -> str | None:
        return f"{self.argv[0]} exited {proc.returncode}" if proc.returncode != 0 else None

    def undo(self) -> tuple[list[str], str | None] | None:
        return None


#: the sidecar's IPv6 inbound passthrough source on lo (as istio-iptables puts it there); the agent does
#: this one in-process (node_agent/backends/iptables/in_process_commands.py keys on this argv)
LO_PASSTHROUGH_V6 = ("ip", "-6", "addr", "replace", PASSTHROUGH_SOURCE[6], "dev", "lo")


def lo_passthrough_v6() -> SideJob:
    return SideJob("lo-v6", list(LO_PASSTHROUGH_V6))


def undo_side_jobs(netns_path: str | None, jobs: Sequence[SideJob], step: str, log: StepLog | None) -> None:
    undos = [u for u in (job.undo() for job in jobs) if u is not None]
    if not undos:
        return
    try:
        procs = spawn.run_many([(netns_argv(netns_path, argv), stdin) for argv, stdin in undos], TIMEOUT)
    except OSError as exc:
        emit(log, "error", step, "undoing the netns set-up failed", error=str(exc))
        return
    for (argv, _), proc in zip(undos, procs, strict=True):
        if proc.returncode != 0:
            emit(log, "error", step, "undoing the netns set-up failed", argv=argv, error=proc.stderr.strip())


def run_with_side_jobs(
    netns_path: str | None, jobs: Sequence[tuple[list[str], str | None]], side_jobs: Sequence[SideJob]
) -> tuple[list[spawn.Result], IptablesError | None]:
    """Run `jobs` (argv already netns-wrapped) and the side jobs together. A batch that cannot be started
    is reported as the first side job's error (the side job always ran first before batching: same
    outcome). The error is the first failed side job's."""
    if not side_jobs:
        return spawn.run_many(jobs, TIMEOUT), None
    side = [(netns_argv(netns_path, sj.argv), sj.stdin) for sj in side_jobs]
    try:
        procs = spawn.run_many([*jobs, *side], TIMEOUT)
    except FileNotFoundError as exc:
        missing = side[0][0][0] if netns_path is None else "nsenter"
        return [], IptablesError(side_jobs[0].step, f"{missing} not found", str(exc), missing=True)
    except OSError as exc:
        return [], IptablesError(side_jobs[0].step, f"{side[0][0][0]} could not be started", str(exc))
    errors = [sj.error(proc) for sj, proc in zip(side_jobs, procs[len(jobs) :], strict=True)]
    return procs[: len(jobs)], next((e for e in errors if e is not None), None)


def restore_many_with(
    netns_path: str | None,
    flavour: Flavour,
    texts: dict[Family, str],
    step: str,
    side_jobs: Sequence[SideJob],
) -> tuple[dict[Family, IptablesError | None], IptablesError | None]:
    """`restore_many`, plus the side jobs in the same batch of processes."""
    if not side_jobs:
        return restore_many(netns_path, flavour, texts, step), None
    fams = list(texts)
    jobs: list[tuple[list[str], str | None]] = [
        (netns_argv(netns_path, restore_argv(flavour, fam)), texts[fam]) for fam in fams
    ]
    procs, side_error = run_with_side_jobs(netns_path, jobs, side_jobs)
    if not procs:
        return {}, side_error
    return {fam: restore_result(flavour, fam, proc, step) for fam, proc in zip(fams, procs, strict=True)}, side_error


def save_with(
    netns_path: str | None, flavour: Flavour, families: Sequence[Family], side_jobs: Sequence[SideJob]
) -> tuple[dict[Family, str], IptablesError | None]:
    """`save_families`, plus the side jobs in the same batch of processes."""
    if not side_jobs:
        return save_families(netns_path, flavour, families), None
    jobs: list[tuple[list[str], str | None]] = [(netns_argv(netns_path, save_argv(flavour, f)), None) for f in families]
    procs, side_error = run_with_side_jobs(netns_path, jobs, side_jobs)
    if not procs:
        return {}, side_error
    return save_results(flavour, families, procs), side_error
