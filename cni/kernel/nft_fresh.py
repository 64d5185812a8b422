"""A new pod netns' sidecar tables created from the plugin's own process, without `nft` or
`iptables-nft-restore`.

Those processes cost the plugin's standalone ADD a start each, plus their parsing and cache fetches:
milliseconds, where the kernel's part is a fraction of one. For what the in-process builders lay out —
a REDIRECT-mode nftables table (`cni.rules.nft_batch`), the optimistic ADD's fresh iptables restore
texts on an iptables-nft host (`cni.rules.xt_fresh_rules` read by `cni.rules.nft_compat_batch`: every
family's tables in one transaction) — the plugin (single-threaded) enters the pod netns itself, sends
the batch (each table with NLM_F_EXCL: one already there fails it, changing nothing), puts `::6` on `lo`
for IPv6 over rtnetlink, and goes back to its own netns. Whatever it does not do — a part not laid out,
a table already there, a kernel refusal, a netns it cannot enter — is declined with nothing changed, and
the caller starts its processes as before (which then also report a refusal in the tools' words).
Stdlib only and cheap to import.
"""

from __future__ import annotations

from cni.kernel.iptables_run import IptablesError
from cni.kernel.loopback_address import passthrough_v6_here
from cni.kernel.netns import NetnsReturnError, entered
from cni.kernel.nft_commit import declined_here
from cni.netlink.nft_messages import NFPROTO_INET, delete_tables, frame_families

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Mapping

    from cni.contract.kinds import Family
    from cni.rules.nft_text import NftTable

def create_fresh(netns_path: str, table: NftTable, loopback_v6: bool, step: str) -> str | None:
    """nftables: None when `table` (and, `loopback_v6`, ::6 on lo) is in place in the netns at
    `netns_path`; else why it was declined, nothing changed. See `commit_fresh` for the errors."""
    from cni.rules.nft_batch import Unsupported, batch

    try:
        created = batch(table)
    except Unsupported as exc:
        return f"not built in-process: {exc}"
    return commit_fresh(netns_path, created, delete_tables([(NFPROTO_INET, table.name)]), loopback_v6, step)


def create_fresh_xt(netns_path: str, texts: Mapping[Family, str], loopback_v6: bool, step: str) -> str | None:
    """iptables-nft: `create_fresh` for the fresh restore texts of an optimistic ADD, one per family
    (4 or 6), all of them in one transaction."""
    from cni.rules.nft_compat_batch import FAMILIES, changes
    from cni.rules.xt_fresh_rules import Unsupported, read_fresh

    try:
        tables = [t for family, text in texts.items() for t in read_fresh(text, family)]
        created = frame_families([(FAMILIES[t.family], c) for t in tables for c in changes((t,))], 1)
    except Unsupported as exc:
        return f"not built in-process: {exc}"
    undo = delete_tables([(FAMILIES[t.family], t.name) for t in tables])
    return commit_fresh(netns_path, created, undo, loopback_v6, step)


def commit_fresh(netns_path: str, batch: tuple[bytes, int], undo: tuple[bytes, int], loopback_v6: bool,
                 step: str) -> str | None:
    """From inside the netns: `batch` (data, acknowledged sequence number), then ::6 on lo; `undo` when
    the address fails. None when done, else why declined (nothing changed). IptablesError (of `step`)
    when `undo` failed too (the tables stay: the runtime's DEL removes them) or when the process could
    not go back to its own netns. The caller holds the netns flock."""
    try:
        with entered(netns_path):
            declined = declined_here(*batch)
            if declined is not None or not loopback_v6:
                return declined
            try:
                passthrough_v6_here()
            except OSError as exc:
                undone = declined_here(*undo)
                if undone is not None:
                    raise IptablesError(step, "the tables went in, ::6 on lo did not, and the tables could not "
                                        "be taken out", f"{exc}; taking them out: {undone}") from exc
                return f"::6 on lo: {exc}"
            return None
    except NetnsReturnError as exc:
        raise IptablesError(step, "cannot go back to the plugin's own netns", str(exc)) from exc
    except OSError as exc:  # entering the netns
        return f"entering {netns_path}: {exc.strerror or exc}"
    except ImportError as exc:  # no `_ctypes` in this runtime (Python < 3.12): the processes do it
        return f"entering {netns_path}: {exc}"
