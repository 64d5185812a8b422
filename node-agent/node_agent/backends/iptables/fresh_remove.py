"""Take out, in-process, a sidecar pod's rules that are still exactly what the agent wrote into its new
netns: no iptables-save / iptables-restore process.

- nft (`remove_fresh_nft`): `nft_fresh_write` creates iptables-nft's tables of a new pod netns itself
  (NLM_F_EXCL: they did not exist), and the backend records that state with the netns' ruleset
  generation right after it (`DriftShortcut.record_written`: only iptables-nft's tables and ours were
  there, every commit in between was that write). When the generation is still that one, nothing in the
  netns has changed since: the tables hold exactly that write, and deleting them (one transaction, every
  family) puts the netns back as it was before the ADD. Deleting a table with base chains makes the
  socket's close wait for an RCU grace period; it is closed in the background
  (`node_agent.kernel.background_close`).
- legacy (`remove_fresh_legacy`): per family, the tables must hold exactly the blob `xt_fresh_write`
  lays out from the pod's spec (read with the same two getsockopt calls, under the xtables lock); each
  then gets its empty built-in chains back with one `IPT_SO_SET_REPLACE`
  (`xt_fresh_write.unrestore_fresh_here`).

Both run under the netns flock, so the plugin's writers cannot come in between. Anything else (the
generation moved, a table holds more or other rules, the spec is one whose removal also takes policy
routing out, the kernel refuses) is declined and left to `iptables-restore` as before.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import cast

from cni.contract.kinds import Family
from cni.contract.spec import SidecarSpec
from cni.kernel.iptables_run import IptablesError
from cni.kernel.netns_lock import netns_lock
from cni.kernel.nft_commit import declined_here
from cni.netlink import nft_messages
from cni.rules import builder
from cni.rules.nft_compat_batch import FAMILIES
from cni.rules.sidecar import uses_tproxy
from cni.rules.transition import fresh_ruleset_text
from node_agent.backends.iptables.nft_generation import read_here
from node_agent.backends.iptables.xt_fresh_write import unrestore_fresh_here
from node_agent.kernel import background_close
from node_agent.kernel.netns_runner import run_in_netns

STEP = "remove-fresh"


def tables_of(spec: Hashable, families: tuple[int, ...]) -> list[tuple[int, str]] | None:
    """(family, table) of every table the fresh write of `spec` fills; None when such a removal is not
    done here (policy routing to take out as well: TPROXY sidecars, ambient pods)."""
    if not isinstance(spec, SidecarSpec) or uses_tproxy(spec):
        return None
    return [(f, t.table) for f in families for t in builder.sidecar_rules(spec, cast(Family, f)).tables
            if t.chains or t.rules or t.jumps]


def remove_fresh(netns_path: str, flavour: str, spec: Hashable, families: tuple[int, ...],
                 written: bytes | None) -> str | None:
    """The flavour's in-process removal (`written`: the recorded digest of an nft host's fresh write, the
    nft way needs it); None when done, else why it was declined (nothing of ours changed)."""
    if flavour == "legacy":
        return remove_fresh_legacy(netns_path, spec, families)
    if written is None:
        return "no unchanged fresh write recorded"
    return remove_fresh_nft(netns_path, spec, families, written)


def delete_batch(tables: list[tuple[int, str]]) -> tuple[bytes, int]:
    """One transaction deleting these iptables-nft tables (NFT_MSG_DELTABLE by name)."""
    return nft_messages.delete_tables([(FAMILIES[family], name) for family, name in tables])


def remove_fresh_nft(netns_path: str, spec: Hashable, families: tuple[int, ...], digest: bytes) -> str | None:
    """None when the tables of our fresh write are gone; else why it was declined (nothing changed)."""
    tables = tables_of(spec, families)
    if not tables:
        return "not removed in-process: its removal takes policy routing out too"
    data, acked = delete_batch(tables)

    def here() -> str | None:
        if read_here().to_bytes(4, "big") != digest:
            return "the netns changed since our write"
        return declined_here(data, acked, close=background_close.later)

    return _in_netns(netns_path, here)


def remove_fresh_legacy(netns_path: str, spec: Hashable, families: tuple[int, ...]) -> str | None:
    """None when every family's tables, still exactly what the fresh write of `spec` lays out, have their
    empty built-in chains back; else why it was declined (what was put back stays put back: the caller's
    iptables-restore removal then finds nothing of ours there)."""
    if not isinstance(spec, SidecarSpec) or uses_tproxy(spec):
        return "not removed in-process: its removal takes policy routing out too"
    texts = [(f, fresh_ruleset_text(builder.sidecar_rules(spec, cast(Family, f)))) for f in families]

    def here() -> str | None:
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

