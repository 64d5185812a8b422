"""The kernel layer's commands the agent does itself, in the pod netns, instead of starting them.

`cni.kernel` runs them as processes (the plugin has nothing better); the agent's runner
(`node_agent.kernel.netns_spawn.InNetnsSpawner`) looks a command up here by its exact argv and calls the
function from its thread inside the netns:

- `ip -6 addr replace ::6/128 dev lo` — a dual-stack sidecar's inbound passthrough source (the side job
  of every sidecar apply): one rtnetlink request (`loopback_address`), a process fewer per ADD.

and, in `RESTORES`, the commands fed a text that it may do itself or decline (then they are started):

- `ip{,6}tables-legacy-restore --noflush` with the text of an ADD into a new netns (`xt_fresh_write`:
  the table laid out in-process and swapped in with one setsockopt), and `ip{,6}tables-nft-restore` with
  such a text (`nft_fresh_write`: iptables-nft's nf_tables batch built in-process and sent on one
  netlink socket): two processes fewer per dual-stack sidecar ADD (and ambient enrolment). A legacy
  text of several tables (ambient: mangle and nat) declined for the tables' state fails instead of
  starting iptables-legacy-restore (see `legacy_restore_here`);
- `ip -4|-6 -force -batch -` with the ambient policy routing's add lines (`policy_routes_write` over
  rtnetlink): the other two processes of an ambient enrolment.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from cni.contract.kinds import Family
from cni.kernel import spawn
from cni.kernel.iptables_run import restore_argv
from cni.kernel.loopback_address import passthrough_v6_here
from cni.kernel.side_jobs import LO_PASSTHROUGH_V6
from cni.rules import tproxy_routes
from node_agent.backends.iptables.nft_fresh_write import restore_fresh_nft_here
from node_agent.backends.iptables.xt_fresh_write import NOT_LAID_OUT, restore_fresh_here
from node_agent.kernel.netns_spawn import Refused
from node_agent.kernel.policy_routes_write import add_here

IN_PROCESS: dict[tuple[str, ...], Callable[[], None]] = {
    LO_PASSTHROUGH_V6: passthrough_v6_here,
}


def legacy_restore_here(family: int, text: str) -> str | None:
    """`restore_fresh_here`; a text of several tables it declined for their state (not for the text) is
    refused rather than handed to iptables-legacy-restore, which commits table by table and, failing on
    a later table, would leave the earlier ones written: the caller's save → transition path takes it."""
    declined = restore_fresh_here(family, text)
    if declined is not None and not declined.startswith(NOT_LAID_OUT) and text.count("\nCOMMIT") > 1:
        raise Refused(f"in-process write declined ({declined}), several tables: not started")
    return declined


def ambient_routes_here(family: Family, text: str) -> str | spawn.Result | None:
    """`ip -force -batch` with exactly the ambient policy routing's add lines of `family` (the side job of
    every ambient apply): the rule and the route added over rtnetlink. The result reads like ip's: an
    entry that was there already fails its line with "File exists" (success to the caller, and not
    undone by its rollback). Anything else, or a refusal (nothing is left of this call), is declined."""
    lines = tproxy_routes.add_lines(family, tproxy_routes.AMBIENT)
    if text != tproxy_routes.batch_text(lines):
        return "not the ambient routing's batch"
    try:
        created = add_here((family,), tproxy_routes.AMBIENT)
    except OSError as exc:
        return f"refused: {exc}"
    kinds = {entry.kind for entry in created}
    there = [n for n, line in enumerate(lines, 1) if line.split(" ", 1)[0] not in kinds]
    stderr = "".join(f"RTNETLINK answers: File exists\nCommand failed -:{n}\n" for n in there)
    return spawn.Result(1 if there else 0, "", stderr)


RESTORES: dict[tuple[str, ...], Callable[[str], str | spawn.Result | None]] = {
    **{tuple(restore_argv("legacy", family)): partial(legacy_restore_here, family) for family in (4, 6)},
    **{tuple(restore_argv("nft", family)): partial(restore_fresh_nft_here, family) for family in (4, 6)},
    **{tuple(tproxy_routes.argv(family)): partial(ambient_routes_here, family) for family in (4, 6)},
}
