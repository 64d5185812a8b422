"""What a pod's nftables table needs beside it in the pod netns, done in-process by the calling thread
(which is inside the netns: `libnft.session`): nothing is spawned.

- sidecar, REDIRECT, IPv6: `::6` on `lo` (the inbound passthrough source);
- sidecar, TPROXY: the TPROXY policy routing (fwmark 0x539 → local delivery), and `::6` with IPv6;
- ambient: the original-source policy routing (`tproxy_routes.AMBIENT`);
- a TPROXY table replaced by anything else: its policy routing removed.

When a step fails, `add_here` takes back what it created before raising; entries that were there before
stay. `quick_read` is the drift check's one hop into
the netns: the nf_tables ruleset generation and the policy routing, read together.
"""

from __future__ import annotations

import contextlib

from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.kernel.loopback_address import passthrough_v6_here
from cni.kernel.netns import NetnsThreadTimeout
from cni.rules.sidecar import uses_tproxy
from cni.rules.tproxy_routes import AMBIENT, TPROXY, Routing
from node_agent.backends.base import RedirectSpec
from node_agent.backends.iptables.nft_generation import NftGenerationError, read_here
from node_agent.kernel import policy_routes_read, policy_routes_write
from node_agent.kernel.netns_runner import run_in_netns


def routing_of(spec: RedirectSpec) -> Routing | None:
    """The policy routing a table of this spec comes with (None: none)."""
    if isinstance(spec, AmbientSpec):
        return AMBIENT
    if isinstance(spec, SidecarSpec) and uses_tproxy(spec):
        return TPROXY
    return None


def add_here(spec: RedirectSpec, families: tuple[int, ...], replaced_tproxy: bool) -> None:
    """Everything `spec`'s table needs beside it; `replaced_tproxy`: the table before was a TPROXY one.
    OSError when the kernel refuses a step (the routing this call created is deleted first)."""
    routing = routing_of(spec)
    created: list[policy_routes_write.Entry] = []
    try:
        if isinstance(spec, SidecarSpec) and 6 in families:
            passthrough_v6_here()
        if routing is not None:
            created = policy_routes_write.add_here(families, routing)
        if replaced_tproxy and routing is not TPROXY:
            policy_routes_write.remove_here((4, 6), TPROXY)
    except OSError:
        if routing is not None and created:
            with contextlib.suppress(OSError):  # best effort: the apply is failing already
                policy_routes_write.delete_here(created, routing)
        raise


def remove_here(tproxy: bool, ambient: bool) -> None:
    """The policy routing of a removed table (TPROXY and/or ambient), both families; absent is fine."""
    if tproxy:
        policy_routes_write.remove_here((4, 6), TPROXY)
    if ambient:
        policy_routes_write.remove_here((4, 6), AMBIENT)


def quick_read(netns_path: str, families: tuple[int, ...], routing: Routing | None,
               timeout: float = 2.0) -> tuple[int | None, list[str] | None]:
    """(the netns' nf_tables ruleset generation, what is missing of `routing`) from one pooled thread in the
    netns; None for a part that could not be read (the caller lists the table / asks `ip`)."""
    def here() -> tuple[int | None, list[str] | None]:
        try:
            generation: int | None = read_here(timeout)
        except (NftGenerationError, OSError):
            generation = None
        if routing is None:
            return generation, []
        try:
            return generation, policy_routes_read.check_here(families, routing, timeout)
        except (policy_routes_read.PolicyRoutesReadError, OSError):
            return generation, None

    try:
        return run_in_netns(netns_path, here, timeout=timeout + 1.0)
    except (NetnsThreadTimeout, OSError):
        return None, None
