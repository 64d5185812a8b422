"""A pod's backend name as the agent holds it and as its record keeps it.

The iptables backend is one name, `iptables`, in either flavour: rules of one flavour are invisible to the
other. So a record names the flavour too (`iptables-legacy`, `iptables-nft`). A pod recorded with the
node's own flavour is held as `iptables`; one recorded with the other flavour (the node's flavour changed
while the pod ran: another `--iptables` setting, or what `auto` detects) keeps the flavoured name, which
names a backend of that flavour, built only for it: the pod moves to the node's flavour, or (a sidecar pod)
keeps its rules where they are. A record without a flavour (an older agent's) means the node's. The same
goes for the rules backend an eBPF ambient pod's inbound capture is on (the record's `inbound`).
"""

from __future__ import annotations

from cni.kernel.flavour import FLAVOURS

IPTABLES = "iptables"
EBPF = "ebpf"


def flavoured(flavour: str) -> str:
    """The name of the iptables backend of `flavour`: `iptables-legacy`, `iptables-nft`."""
    return f"{IPTABLES}-{flavour}"


def flavour_named(name: str) -> str | None:
    """The flavour in a flavoured iptables name, else None."""
    head, _, flavour = name.partition("-")
    return flavour if head == IPTABLES and flavour in FLAVOURS else None


def recorded(name: str, node_flavour: str) -> str:
    """The name a record keeps for the backend the agent holds as `name` (node_flavour: the flavour of the
    node's iptables backend; anything else, e.g. unresolved, leaves names as they are)."""
    return flavoured(node_flavour) if name == IPTABLES and node_flavour in FLAVOURS else name


def held(name: str, node_flavour: str) -> str:
    """The name the agent holds for a recorded backend name (the inverse of `recorded`)."""
    return IPTABLES if node_flavour in FLAVOURS and name == flavoured(node_flavour) else name
