"""The node-side probe SNAT on an nftables node: `table inet headrace_node` in the agent's own netns,
checked and replaced in-process (libnftables), one transaction; no pod IPs → no table."""

from __future__ import annotations

from cni.rules import nft_builder, nft_text
from node_agent.backends.base import BackendError
from node_agent.backends.nftables import libnft


def sync_node_probe(ips: list[str], netns_path: str | None = None) -> bool:
    """Make the node table SNAT exactly these pod IPs; whether anything had to change."""
    table = nft_builder.node_probe_table(ips)
    listed, = libnft.run_in_netns(netns_path, [nft_text.list_command(nft_text.NODE_TABLE)])
    have = libnft.listing_of(listed)
    if (table is None and have is None) or (table is not None and have == table.render()):
        return False
    text = nft_text.remove_text(nft_text.NODE_TABLE) if table is None else nft_text.replace_text(table)
    (result,) = libnft.run_in_netns(netns_path, [text])
    if result.rc != 0:
        raise BackendError(f"node probe SNAT table refused: {result.error.strip()}")
    return True

