"""Take out, in-process, a pod's rules while its tables hold nothing but them (mostly: still exactly what
the agent wrote into its new netns): no iptables-save / iptables-restore process.

- nft (`remove_fresh_nft`): `nft_fresh_write` creates iptables-nft's tables of a new pod netns itself
  (NLM_F_EXCL: they did not exist), and the backend records that state with the netns' ruleset
  generation right after it (`DriftShortcut.record_written`: only iptables-nft's tables and ours were
  there, every commit in between was that write). When the generation is still that one, nothing in the
  netns has changed since: the tables hold exactly that write, and deleting them (one transaction, every
  family) puts the netns back as it was before the ADD. With no such record (rules the agent found
  intact after its restart, or rewrote in a repair) the ruleset is listed in-process (libnftables) and
  the tables go when they hold nothing but ours (`nft_owned`). The delete names the generation that
  proof is of (NFNL_BATCH_GENID): the kernel refuses it, under its commit lock, when anyone committed
  in the netns since. Deleting a table with base chains makes the socket's close wait for an RCU grace
  period; it is closed in the background (`node_agent.kernel.background_close`).
- legacy (`remove_fresh_legacy`): per family, the tables must hold exactly the blob `xt_fresh_write`
  lays out from the pod's spec (read with the same two getsockopt calls, under the xtables lock); each
  then gets its empty built-in chains back with one `IPT_SO_SET_REPLACE`
  (`xt_fresh_write.unrestore_fresh_here`).

An ambient pod's original-source policy routing (one rule and one route per family) comes out first,
over rtnetlink (`policy_routes_write`), then its tables: an agent killed between the two leaves chains of
ours, which tell the next agent's iptables-restore removal to take the routing too (in the other order it
would find nothing telling it so, and the routing would stay behind). Sidecar pods in REDIRECT mode have
no routing; TPROXY-mode sidecars are not removed here.

Both run under the netns flock, so the plugin's writers cannot come in between. Anything else (the
generation moved, a table holds more or other rules, a TPROXY-mode sidecar, the kernel refuses, the
routing cannot be deleted) is declined and left to `iptables-restore` as before, which takes out what is
left of ours (routing included) and keeps the rest; on legacy hosts a family declined after another came
out is left to it alone (it finds nothing of ours in the other).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import cast

from cni.contract.kinds import Family
from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.kernel.iptables_run import IptablesError
from cni.kernel.netns_lock import netns_lock
from cni.kernel.nft_commit import declined_here
from cni.netlink import nft_messages
from cni.rules import builder
from cni.rules.nft_compat_batch import FAMILIES
from cni.rules.rule_text import RuleSet
from cni.rules.sidecar import uses_tproxy
from cni.rules.tproxy_routes import AMBIENT
from cni.rules.transition import fresh_ruleset_text
from node_agent.backends.iptables.nft_generation import read_here
from node_agent.backends.iptables.nft_owned import not_ours_alone
from node_agent.backends.iptables.xt_fresh_write import unrestore_fresh_here
from node_agent.kernel import background_close
from node_agent.kernel.netns_runner import run_in_netns
from node_agent.kernel.policy_routes_write import remove_here

STEP = "remove-fresh"
TPROXY_DECLINED = "not removed in-process: a TPROXY-mode sidecar's policy routing"


def rulesets_of(spec: Hashable, families: tuple[int, ...]) -> list[RuleSet] | None:
    """The rulesets the fresh write of `spec` lays out, per family; None when its removal is not done here."""
    if isinstance(spec, AmbientSpec):
        from cni.rules import ambient  # ambient pods only

        return [ambient.ambient_rules(spec, cast(Family, f)) for f in families]
    if isinstance(spec, SidecarSpec) and not uses_tproxy(spec):
        return [builder.sidecar_rules(spec, cast(Family, f)) for f in families]
    return None


def tables_of(spec: Hashable, families: tuple[int, ...]) -> list[tuple[int, str]] | None:
    """(family, table) of every table the fresh write of `spec` fills; None when such a removal is not
    done here (a TPROXY-mode sidecar)."""
    rulesets = rulesets_of(spec, families)
    if rulesets is None:
        return None
    return [(rs.family, t.table) for rs in rulesets for t in rs.tables if t.chains or t.rules or t.jumps]


def _routing_out(spec: Hashable, families: tuple[int, ...]) -> str | None:
    """An ambient pod's policy routing of these families deleted (calling thread in the netns); why not."""
    if isinstance(spec, AmbientSpec):
        try:
            remove_here(families, AMBIENT)
        except OSError as exc:
            return f"policy routing: {exc}"
    return None


def remove_fresh(netns_path: str, flavour: str, spec: Hashable, families: tuple[int, ...],
                 written: bytes | None) -> str | None:
    """The flavour's in-process removal (`written`: the recorded digest of an nft host's fresh write);
    None when done, else why it was declined (nothing of ours changed)."""
    if flavour == "legacy":
        return remove_fresh_legacy(netns_path, spec, families)
    return remove_fresh_nft(netns_path, spec, families, written)


def delete_batch(tables: list[tuple[int, str]], genid: int = 0) -> tuple[bytes, int]:
    """One transaction deleting these iptables-nft tables (NFT_MSG_DELTABLE by name); `genid` (not 0): the
    kernel refuses it unless the netns' ruleset generation is still that one."""
    return nft_messages.delete_tables([(FAMILIES[family], name) for family, name in tables], genid=genid)


def remove_fresh_nft(netns_path: str, spec: Hashable, families: tuple[int, ...],
                     digest: bytes | None) -> str | None:
    """None when the tables of the spec's write are gone (an ambient pod's routing deleted first); else why
    it was declined (nothing of the tables changed). `digest`: the generation recorded right after the
    agent's own fresh write, when the tables held nothing else; without one (rules found intact after a
    restart, or rewritten by a repair) the ruleset is read for that (`nft_owned`). Either way the delete
    names the generation its proof is of, and the kernel refuses it when anything was committed since."""
    tables = tables_of(spec, families)
    if not tables:
        return TPROXY_DECLINED

    def here() -> str | None:
        generation = read_here()
        if digest is not None and generation.to_bytes(4, "big") != digest:
            return "the netns changed since our write"
        if digest is None and (why := _not_ours_here(tables)) is not None:
            return why
        if (why := _routing_out(spec, families)) is not None:
            return why
        data, acked = delete_batch(tables, generation)
        return declined_here(data, acked, close=background_close.later)

    return _in_netns(netns_path, here)


def _not_ours_here(tables: list[tuple[int, str]]) -> str | None:
    """Why these iptables-nft tables of the calling thread's netns are not ours alone (None: they are),
    from the ruleset libnftables lists in-process."""
    from node_agent.backends.base import BackendError
    from node_agent.backends.nftables import libnft

    try:
        with libnft.session(None) as nft:
            listed = nft.cmd("list ruleset", json=True)
    except BackendError as exc:
        return f"the ruleset cannot be read in-process: {exc}"
    if listed.rc != 0:
        return f"nft list ruleset: {listed.error.strip()[:200]}"
    return not_ours_alone(listed.output, tables)


def remove_fresh_legacy(netns_path: str, spec: Hashable, families: tuple[int, ...]) -> str | None:
    """None when every family's tables, still exactly what the fresh write of `spec` lays out, have their
    empty built-in chains back (an ambient pod's routing deleted first); else why it was declined (what
    was put back stays put back: the caller's iptables-restore removal then finds nothing of ours there)."""
    rulesets = rulesets_of(spec, families)
    if rulesets is None:
        return TPROXY_DECLINED
    texts = [(rs.family, fresh_ruleset_text(rs)) for rs in rulesets]

    def here() -> str | None:
        if (why := _routing_out(spec, families)) is not None:
            return why
        for family, text in texts:
            declined = unrestore_fresh_here(family, text)
            if declined is not None:
                return f"IPv{family}: {declined}"
        return None

    return _in_netns(netns_path, here)


def _in_netns(netns_path: str, here: Callable[[], str | None]) -> str | None:
    try:
        with netns_lock(netns_path, STEP):
            return run_in_netns(netns_path, here)
    except IptablesError as exc:  # the lock: netns gone or busy
        return str(exc)
    except Exception as exc:  # the thread's error (cannot enter, a socket failed)
        return f"in-process removal: {exc}"

