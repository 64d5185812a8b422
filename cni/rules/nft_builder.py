"""Pure nftables rule builder: redirect spec + the pod's address families → the pod's whole table.

The public face of the nftables rule modules (what the kernel layer, the agent's backend and the tests
use); `nft_text` holds the canonical text and the transaction texts, `nft_sidecar`, `nft_ambient` and
`nft_node_probe` one kind of ruleset each. Everything of a pod is in `table inet headrace`; the node's
probe SNAT in `table inet headrace_node`.
"""

from __future__ import annotations

from cni.rules.nft_text import (
    NODE_TABLE,
    POD_TABLE,
    TABLE_FAMILY,
    Chain,
    NftTable,
    create_text,
    list_command,
    remove_text,
    replace_text,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Iterable

    from cni.contract.kinds import Family
    from cni.contract.sidecar_params import SidecarParams
    from cni.contract.spec import AmbientSpec, SidecarSpec

__all__ = [
    "NODE_TABLE",
    "POD_TABLE",
    "TABLE_FAMILY",
    "Chain",
    "NftTable",
    "ambient_table",
    "create_text",
    "list_command",
    "node_probe_table",
    "pod_families",
    "remove_text",
    "replace_text",
    "sidecar_table",
]


def pod_families(families: Iterable[object]) -> tuple[Family, ...]:
    """The families in canonical order (4 before 6), deduplicated; ValueError on anything else or none."""
    found = set()
    for f in families:
        if f not in (4, 6) or isinstance(f, bool):
            raise ValueError(f"address family must be 4 or 6, not {f!r}")
        found.add(f)
    if not found:
        raise ValueError("at least one address family is required")
    out: list[Family] = []
    if 4 in found:
        out.append(4)
    if 6 in found:
        out.append(6)
    return tuple(out)


def sidecar_table(spec: SidecarSpec | SidecarParams, families: Iterable[object]) -> NftTable:
    from cni.rules.nft_sidecar import sidecar_chains

    return NftTable(POD_TABLE, sidecar_chains(spec, pod_families(families)))


def ambient_table(spec: AmbientSpec, families: Iterable[object]) -> NftTable:
    from cni.rules.nft_ambient import ambient_chains

    return NftTable(POD_TABLE, ambient_chains(spec, pod_families(families)))


def node_probe_table(pod_ips: Iterable[object]) -> NftTable | None:
    from cni.rules.nft_node_probe import node_probe_table as build

    return build(pod_ips)
