"""Create our table in a netns that has none, from the calling thread (inside that netns), without
libnftables: the batch `fresh_batch` builds, sent on a netfilter netlink socket (`nft_commit`)."""

from __future__ import annotations

from cni.rules.nft_text import NftTable
from node_agent.backends.nftables.fresh_batch import Unsupported, batch
from node_agent.kernel.nft_commit import EXISTS, declined_here

__all__ = ["EXISTS", "create_here"]


def create_here(table: NftTable) -> str | None:
    """None when `table` was created; else why not (nothing changed): `EXISTS`, or a part not laid out
    here, or what the kernel answered (`nft_commit.declined_here`); libnftables then takes the text."""
    try:
        data, acked = batch(table)
    except Unsupported as exc:
        return f"not built in-process: {exc}"
    return declined_here(data, acked)
