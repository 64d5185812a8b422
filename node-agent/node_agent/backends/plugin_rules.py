"""Which of the agent's backends writes the rules the plugin writes with its settings (pure): the plugin's
sidecar rules go in with the nftables backend or the iptables backend of the flavour its `iptables`
setting resolves to. The warm ADD applies with such a backend only (so the plugin's DEL can remove the
rules when the agent is gone), and a DEL whose plugin would remove such rules learns that the agent
removed them for a pod it held on that backend (nothing left for the plugin to do)."""

from __future__ import annotations

from cni.kernel import flavour as flavour_mod
from node_agent.backends.base import RedirectBackend
from node_agent.backends.iptables.backend import IptablesBackend


def writes_like_plugin(backend: RedirectBackend, setting: str, iptables: str) -> bool:
    """Whether `backend` writes what the plugin writes with backend `setting` ("iptables", "nftables") and
    iptables setting `iptables`."""
    if setting == "nftables":
        return backend.name == "nftables"
    if setting != "iptables" or not isinstance(backend, IptablesBackend):
        return False
    try:
        return backend.flavour == flavour_mod.resolve(iptables)
    except ValueError:
        return False
