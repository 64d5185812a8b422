"""A new pod netns' sidecar table created from the plugin's own process, without the `nft` binary.

`nsenter … nft -f -` costs the plugin's standalone nftables ADD a process start, libnftables' parsing
and its cache fetch: milliseconds, where the kernel's part is ~0.3 ms. For a REDIRECT-mode table
`cni.rules.nft_batch` lays out, the plugin (single-threaded) enters the pod netns itself, sends the batch
(the table with NLM_F_EXCL: a table already there fails it, changing nothing), puts `::6` on `lo` for
IPv6 over rtnetlink, and goes back to its own netns. Whatever it does not do — a part not laid out, a
table already there, a kernel refusal, a netns it cannot enter — is declined with nothing changed, and
`nft_tables` takes the `nft -f` way as before (which then also reports the kernel's refusal in nft's
words). Stdlib only and cheap to import.
"""

from __future__ import annotations

from cni.kernel.loopback_address import replace_on_loopback
from cni.kernel.netns import NetnsReturnError, entered
from cni.kernel.nft_commit import declined_here
from cni.netlink.nft_messages import NFPROTO_INET, delete_tables
from cni.rules.nft_batch import Unsupported, batch

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from cni.rules.nft_text import NftTable

LOOPBACK_V6 = "::6"  # the sidecar's IPv6 inbound passthrough source (rule_text.PASSTHROUGH_SOURCE[6])


class LeftBehind(OSError):
    """The table went in, `::6` on lo did not, and taking the table out failed too."""


def create_fresh(netns_path: str, table: NftTable, loopback_v6: bool) -> str | None:
    """None when `table` (and, `loopback_v6`, ::6 on lo) is in place in the netns at `netns_path`; else why
    it was declined, nothing changed. LeftBehind when the table could not be taken out again after the
    address failed; NetnsReturnError when the process could not go back to its own netns. The caller
    holds the netns flock."""
    try:
        data, acked = batch(table)
    except Unsupported as exc:
        return f"not built in-process: {exc}"
    try:
        with entered(netns_path):
            declined = declined_here(data, acked)
            if declined is not None or not loopback_v6:
                return declined
            try:
                replace_on_loopback(LOOPBACK_V6)
            except OSError as exc:
                undone = declined_here(*delete_tables([(NFPROTO_INET, table.name)]))
                if undone is not None:
                    raise LeftBehind(f"{exc}; taking table {table.name} out again: {undone}") from exc
                return f"{LOOPBACK_V6} on lo: {exc}"
            return None
    except (NetnsReturnError, LeftBehind):
        raise
    except OSError as exc:  # entering the netns
        return f"entering {netns_path}: {exc.strerror or exc}"
