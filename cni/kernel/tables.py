"""Apply, check and remove headrace's iptables rules inside a network namespace, atomically.

The public entry points (sidecar, ambient, node probe SNAT, removal, `installed`). Writers hold a flock on
the netns file (netns_lock.py). Per address family the current state is read with iptables-save, then ONE
`iptables-restore --noflush` replaces everything of ours in one transaction (the text comes from
cni/rules/transition.py): our old jump rules are deleted (`-D`), our chains are declared (which creates
or flushes them) and refilled, stale chains of ours are flushed and deleted, and our jumps are inserted
at the top of the built-in chains. Applying twice therefore leaves exactly one set. The families'
restores run in parallel; if one fails (after one retry from a fresh save), the families that went in are
put back to their saved state (rollback, apply.py). Removal deletes exactly our jumps and chains, so the
netns is left as it was before (tables that did not exist before stay as empty tables: a legacy table
cannot be unloaded once created). Commands run through iptables_run.py (`nsenter`, `posix_spawn`).

Stdlib only: imported by the CNI plugin, so nothing here imports `subprocess`, `dataclasses`, `typing`,
`contextlib` or `shlex` at run time (each costs the plugin milliseconds of start-up).
"""

from __future__ import annotations

import os

from cni.kernel.apply import apply_rulesets, check_rulesets, require_netns, set_owned, valid_families
from cni.kernel.iptables_run import IptablesError, emit, restore_many, save, save_families
from cni.kernel.netns_lock import netns_lock
from cni.kernel.side_jobs import SideJob, lo_passthrough_v6
from cni.rules import rule_text, sidecar
from cni.rules.saved import owned, owned_all, parse_save
from cni.rules.transition import desired_from_ruleset, transition

_AM_PREFIX = "HEADRACE_AM_"  # cni.rules.ambient.AMBIENT_PREFIX (not imported: the plugin's DEL stays lean)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Iterable

    from cni.contract.kinds import Family
    from cni.contract.sidecar_params import SidecarParams
    from cni.contract.spec import AmbientSpec, SidecarSpec
    from cni.kernel.flavour import Flavour
    from cni.kernel.iptables_run import StepLog


def apply_sidecar(
    netns_path: str,
    spec: SidecarSpec | SidecarParams,
    families: Iterable[Family],
    flavour: Flavour,
    *,
    log: StepLog | None = None,
    optimistic: bool = False,
    fresh_here: bool = False,
) -> None:
    """Install (or replace) the sidecar chains in the pod netns; all families or none.

    With IPv6, ::6/128 is also put on `lo` (as istio-iptables does) so the sidecar can bind its inbound
    passthrough source; the address is left in place on removal (harmless, dies with the pod netns). It
    is added in parallel with the first iptables step; if that fails, the rules are rolled back.
    TPROXY mode (`sidecar.uses_tproxy`): instead, one `ip -batch` per family adds the policy routing (and
    the ::6 address), in parallel with the first iptables step likewise; a failure on either side rolls
    both back (the routing entries this run created are deleted). Replacing TPROXY rules by REDIRECT ones
    deletes the policy routing.
    `optimistic` (the CNI ADD into a fresh netns): try the one-restore-per-family `fresh_text` first;
    `fresh_here` (the plugin's, on iptables-nft): that from this process, without a restore process."""
    fams = valid_families(families)
    rulesets = [sidecar.sidecar_rules(spec, f) for f in fams]
    tproxy = sidecar.uses_tproxy(spec)
    jobs: list[SideJob]
    if tproxy:
        from cni.kernel.tproxy import TproxyRoutesJob  # TPROXY pods only: REDIRECT ADDs do not load it

        jobs = [TproxyRoutesJob(f) for f in fams]
    elif 6 in fams:
        jobs = [lo_passthrough_v6()]
    else:
        jobs = []
    step = "apply-sidecar"
    require_netns(netns_path, step)
    with netns_lock(netns_path, step):
        before = apply_rulesets(
            netns_path, rulesets, flavour, sidecar.SIDECAR_PREFIX, step, log, optimistic=optimistic, side_jobs=jobs,
            fresh_here=fresh_here,
        )
        if not tproxy:
            was_tproxy = [fam for fam, owned_before in before.items() if "mangle" in owned_before]
            if was_tproxy:
                from cni.kernel.tproxy import remove_tproxy_routes

                remove_tproxy_routes(netns_path, was_tproxy, log=log)


def check_sidecar(
    netns_path: str, spec: SidecarSpec | SidecarParams, families: Iterable[Family], flavour: Flavour
) -> list[str]:
    """Problems with the sidecar rules (and, in TPROXY mode, the policy routing); empty when intact."""
    fams = valid_families(families)
    rulesets = [sidecar.sidecar_rules(spec, f) for f in fams]
    problems = check_rulesets(netns_path, rulesets, flavour)
    if sidecar.uses_tproxy(spec) and not (netns_path is not None and not os.path.exists(netns_path)):
        from cni.kernel.tproxy import check_tproxy_routes

        problems.extend(check_tproxy_routes(netns_path, fams))
    return problems


def apply_ambient(
    netns_path: str,
    spec: AmbientSpec,
    families: Iterable[Family],
    flavour: Flavour,
    *,
    log: StepLog | None = None,
    optimistic: bool = False,
) -> None:
    """Install (or replace) the ambient in-pod chains in the pod netns; all families or none.

    With them, per family, the policy routing of the node proxy's original-source connections
    (tproxy_routes.AMBIENT: `fwmark 0x111/0xfff lookup 100`, `local default dev lo table 100`), added in
    parallel with the first iptables step; a failure on either side rolls both back.
    `optimistic` (the agent, whose runner writes a fresh text in-process and refuses a legacy one of
    several tables it cannot take): try `fresh_text` first, as a sidecar ADD does."""
    from cni.kernel.tproxy import RoutesJob  # ambient pods only (the agent's backend)
    from cni.rules import ambient
    from cni.rules.tproxy_routes import AMBIENT

    fams = valid_families(families)
    rulesets = [ambient.ambient_rules(spec, f) for f in fams]
    jobs: list[SideJob] = [RoutesJob(f, AMBIENT) for f in fams]
    require_netns(netns_path, "apply-ambient")
    with netns_lock(netns_path, "apply-ambient"):
        apply_rulesets(netns_path, rulesets, flavour, ambient.AMBIENT_PREFIX, "apply-ambient", log,
                       optimistic=optimistic, side_jobs=jobs)


def check_ambient(netns_path: str, spec: AmbientSpec, families: Iterable[Family], flavour: Flavour) -> list[str]:
    """Problems with the ambient iptables rules (their policy routing: `check_ambient_routes`)."""
    from cni.rules import ambient  # ambient pods only (the agent's backend)
    rulesets = [ambient.ambient_rules(spec, f) for f in valid_families(families)]
    return check_rulesets(netns_path, rulesets, flavour)


def check_ambient_routes(netns_path: str | None, families: Iterable[Family]) -> list[str]:
    """Problems with the ambient policy routing alone (a netns that is gone has none to report)."""
    if netns_path is not None and not os.path.exists(netns_path):
        return []
    from cni.kernel.tproxy import check_routes
    from cni.rules.tproxy_routes import AMBIENT

    return check_routes(netns_path, families, AMBIENT)


def remove_all(netns_path: str | None, flavour: Flavour, *, log: StepLog | None = None,
               keep_routing: bool = False) -> None:
    """Delete every HEADRACE_* chain and every jump into one, both families, and the policy routing that
    comes with them (unless `keep_routing`: another backend now uses the same entries). Idempotent; a netns
    that does not exist (any more) is success."""
    if netns_path is not None and not os.path.exists(netns_path):
        emit(log, "info", "remove", "netns already gone", netns=netns_path)
        return
    try:
        with netns_lock(netns_path, "remove"):
            saved = save_families(netns_path, flavour, (4, 6))
            parsed = {f: parse_save(saved[f]) for f in (4, 6)}
            texts: dict[Family, str] = {f: transition(parsed[f], {}, rule_text.OWNED_PREFIX) for f in (4, 6)}
            # TPROXY-mode sidecar chains (mangle) come with policy routing: removed along with them
            both: tuple[Family, ...] = (4, 6)
            tproxy_fams = [
                f for f in both if "mangle" in parsed[f] and owned(parsed[f]["mangle"], sidecar.SIDECAR_PREFIX).chains
            ]
            # ambient chains (mangle) come with the original-source policy routing likewise
            ambient_fams = [f for f in both if "mangle" in parsed[f] and owned(parsed[f]["mangle"], _AM_PREFIX).chains]
            if keep_routing:  # another backend's redirection beside ours uses the same entries
                tproxy_fams = ambient_fams = []
            # the routing before the chains: a removal cut short between the two leaves chains, which tell
            # the next one to take the routing too (the other way round nothing would)
            if tproxy_fams:
                from cni.kernel.tproxy import remove_tproxy_routes

                remove_tproxy_routes(netns_path, tproxy_fams, log=log)
            if ambient_fams:
                from cni.kernel.tproxy import remove_routes
                from cni.rules.tproxy_routes import AMBIENT

                remove_routes(netns_path, ambient_fams, AMBIENT, log=log)
            # both families' restores at once; a failed one is retried once from a fresh save
            results = restore_many(netns_path, flavour, {f: t for f, t in texts.items() if t}, "remove")
            for family, err in results.items():
                if err is not None:
                    step = f"remove-v{family}"
                    set_owned(netns_path, flavour, family, {}, rule_text.OWNED_PREFIX, step, attempts=1)
    except IptablesError:
        if netns_path is not None and not os.path.exists(netns_path):
            return
        raise
    emit(log, "info", "remove", "iptables rules removed", flavour=flavour)


def installed(netns_path: str | None, flavour: Flavour) -> bool:
    """Whether any HEADRACE_* chain or jump exists in the netns (either family)."""
    if netns_path is not None and not os.path.exists(netns_path):
        return False
    saved = save_families(netns_path, flavour, (4, 6))
    return any(owned_all(parse_save(text), rule_text.OWNED_PREFIX) for text in saved.values())


def sync_node_probe_rules(
    netns_path: str | None,
    pod_ips: Iterable[object],
    flavour: Flavour,
    *,
    log: StepLog | None = None,
) -> None:
    """Make HEADRACE_POSTROUTING (nat) in the node's netns SNAT host-originated TCP to exactly these pod
    IPs to the probe address; one atomic restore per family. A family without pod IPs gets no chain."""
    from cni.rules import node_probe  # the agent's node netns only
    require_netns(netns_path, "node-probe")
    ips = node_probe.parse_pod_ips(pod_ips)
    with netns_lock(netns_path, "node-probe"):
        for family in (4, 6):
            fam_ips = [ip for ip in ips if ip.version == family]
            desired = desired_from_ruleset(node_probe.node_probe_rules(fam_ips, family)) if fam_ips else {}
            set_owned(netns_path, flavour, family, desired, node_probe.NODE_CHAIN, f"node-probe-v{family}")
    emit(log, "info", "node-probe", "node probe SNAT rules synced", pod_ips=[str(i) for i in ips])


def check_node_probe_rules(netns_path: str | None, pod_ips: Iterable[object], flavour: Flavour) -> list[str]:
    from cni.rules import node_probe  # the agent's node netns only
    ips = node_probe.parse_pod_ips(pod_ips)
    problems: list[str] = []
    for family in (4, 6):
        fam_ips = [ip for ip in ips if ip.version == family]
        rs = node_probe.node_probe_rules(fam_ips, family)
        if fam_ips:
            problems.extend(check_rulesets(netns_path, [rs], flavour))
        else:
            current = parse_save(save(netns_path, flavour, family))
            for name in owned_all(current, node_probe.NODE_CHAIN):
                problems.append(f"IPv{family} {name}: unexpected {node_probe.NODE_CHAIN} (no pod IPs of this family)")
    return problems
