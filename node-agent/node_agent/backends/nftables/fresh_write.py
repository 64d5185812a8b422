"""Create our table in a netns that has none, from the calling thread (inside that netns), without
libnftables: the batch `cni.rules.nft_batch` builds (remembered per table: every sidecar pod of one spec
gets the same), sent on a netfilter netlink socket (`cni.kernel.nft_commit`)."""

from __future__ import annotations

from functools import lru_cache

from cni.kernel.nft_commit import EXISTS, declined_here
from cni.rules.nft_batch import Unsupported
from cni.rules.nft_batch import batch as build
from cni.rules.nft_text import NftTable

__all__ = ["EXISTS", "create_here"]

batch = lru_cache(maxsize=64)(build)


def create_here(table: NftTable) -> str | None:
    """None when `table` was created; else why not (nothing changed): `EXISTS`, or a part not laid out
    here, or what the kernel answered (`nft_commit.declined_here`); libnftables then takes the text."""
    try:
        data, acked = batch(table)
    except Unsupported as exc:
        return f"not built in-process: {exc}"
    return declined_here(data, acked)
