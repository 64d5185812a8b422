"""Policy routing for transparent delivery in a pod netns (cni.rules.tproxy_routes: TPROXY for sidecar
TPROXY mode, AMBIENT for the node proxy's original-source connections to the app): added as a side job of
the apply (rolled back with it), removed, checked. Independent of the packet-filter backend: anything that
installs a pod's interception can add, check and remove it. Loaded only for the pods that need it."""

from __future__ import annotations

from cni.kernel import spawn
from cni.kernel.apply import valid_families
from cni.kernel.iptables_run import TIMEOUT, IptablesError, emit, netns_argv
from cni.kernel.side_jobs import SideJob, run_with_side_jobs, undo_side_jobs
from cni.rules import tproxy_routes
from cni.rules.tproxy_routes import TPROXY

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Iterable

    from cni.contract.kinds import Family
    from cni.kernel.iptables_run import StepLog
    from cni.rules.tproxy_routes import Routing


class RoutesJob(SideJob):
    """One family's policy routing (and, TPROXY IPv6, the ::6 address): an `ip -force -batch` where a rule
    or route that exists already is success; a rollback deletes exactly what this run created."""

    __slots__ = ("added", "family", "lines", "routing")

    def __init__(self, family: Family, routing: Routing = TPROXY) -> None:
        self.family = family
        self.routing = routing
        self.lines = tproxy_routes.add_lines(family, routing)
        self.added: list[str] = []
        super().__init__(f"{routing.name}-v{family}", tproxy_routes.argv(family), tproxy_routes.batch_text(self.lines))

    def _failure(self, proc: spawn.Result) -> str | None:
        why = tproxy_routes.add_error(self.lines, proc.stderr, proc.returncode or 0)
        if why is None:
            self.added = tproxy_routes.newly_added(self.lines, proc.stderr)
        return why

    def undo(self) -> tuple[list[str], str | None] | None:
        if not self.done or not self.added:
            return None
        return self.argv, tproxy_routes.batch_text(tproxy_routes.undo_lines(self.added))


TproxyRoutesJob = RoutesJob  # the sidecar TPROXY name (routing defaults to TPROXY)


def add_routes(
    netns_path: str | None, families: Iterable[Family], routing: Routing, *, log: StepLog | None = None
) -> list[RoutesJob]:
    """Add this policy routing on its own (a packet-filter backend that does not batch it with its rules),
    all families or none. Returns the jobs: `undo_routes` takes back exactly what they created (the
    caller's rollback when its own rules then fail). Raises IptablesError."""
    jobs = [RoutesJob(f, routing) for f in valid_families(families)]
    _, error = run_with_side_jobs(netns_path, [], jobs)
    if error is not None:
        undo_side_jobs(netns_path, jobs, routing.name, log)
        raise error
    return jobs


def undo_routes(netns_path: str | None, jobs: list[RoutesJob], *, log: StepLog | None = None) -> None:
    """Delete what `add_routes` created (entries that were there before it stay)."""
    undo_side_jobs(netns_path, jobs, jobs[0].routing.name if jobs else "routes", log)


def remove_routes(
    netns_path: str | None, families: Iterable[Family], routing: Routing, *, log: StepLog | None = None
) -> None:
    """Delete this policy routing (rule + local route) of these families; absent entries are fine."""
    fams = valid_families(families)
    batches = [(tproxy_routes.argv(f), tproxy_routes.del_lines(f, routing)) for f in fams]
    step = f"{routing.name}-remove"
    try:
        procs = spawn.run_many(
            [(netns_argv(netns_path, argv), tproxy_routes.batch_text(lines)) for argv, lines in batches], TIMEOUT
        )
    except OSError as exc:
        raise IptablesError(step, "ip could not be started", str(exc)) from exc
    for fam, (_, lines), proc in zip(fams, batches, procs, strict=True):
        if proc.returncode is None:
            raise IptablesError(f"{step}-v{fam}", f"ip timed out after {TIMEOUT:.0f}s")
        why = tproxy_routes.del_error(lines, proc.stderr, proc.returncode)
        if why is not None:
            raise IptablesError(f"{step}-v{fam}", why)
    emit(log, "info", routing.name, "policy routing removed", families=list(fams))


def check_routes(netns_path: str | None, families: Iterable[Family], routing: Routing) -> list[str]:
    """Problems with this policy routing (missing rule or route), per family."""
    fams = valid_families(families)
    text = tproxy_routes.batch_text(tproxy_routes.check_lines(routing))
    try:
        procs = spawn.run_many([(netns_argv(netns_path, tproxy_routes.argv(f)), text) for f in fams], TIMEOUT)
    except OSError as exc:
        return [f"cannot read the policy routing: ip could not be started: {exc}"]
    problems: list[str] = []
    for fam, proc in zip(fams, procs, strict=True):
        if proc.returncode is None:
            problems.append(f"IPv{fam} policy routing: ip timed out")
            continue
        problems.extend(tproxy_routes.check_problems(fam, proc.stdout, routing))
    return problems


def remove_tproxy_routes(netns_path: str | None, families: Iterable[Family], *, log: StepLog | None = None) -> None:
    """Delete the sidecar TPROXY policy routing of these families; absent entries are fine."""
    remove_routes(netns_path, families, TPROXY, log=log)


def check_tproxy_routes(netns_path: str | None, families: Iterable[Family]) -> list[str]:
    """Problems with the sidecar TPROXY policy routing (missing rule or route), per family."""
    return check_routes(netns_path, families, TPROXY)
