"""iptables redirection for headrace: a pure rule builder, flavour detection and atomic in-netns apply.

Stdlib only: the CNI plugin imports this package on its hot path.

- `builder`: SidecarSpec / AmbientSpec / node probe IPs + address family → rules in iptables-save syntax.
- `flavour`: legacy vs nft, detected from the real rules of the current netns (or forced).
- `netns_tables`: save/restore inside a netns with `nsenter`, one atomic restore per family, rollback,
  idempotent re-apply (an optimistic `-N` restore first on a fresh netns), exact removal, CHECK against
  the builder's output.
- `spawn`: starts those commands with `os.posix_spawnp` (cheaper to import than `subprocess`).
"""
