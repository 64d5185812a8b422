"""iptables rules for headrace, pure and stdlib only (the CNI plugin imports this package on its hot path).

- `builder`: the public face: SidecarSpec / AmbientSpec / node probe IPs + address family → rules.
- `rule_text`: iptables-save canonical rule text (each rule carries a `headrace: <purpose>` comment), the
  RuleSet / TableRules records, validation of rule values.
- `sidecar`, `ambient`, `node_probe`: the rule sets of each kind.
- `saved`: parse an iptables-save dump; which chains, rules and jumps in it are ours.
- `transition`: the restore text that turns our part of a dump into the wanted rules (or installs them
  into a fresh netns with `-N`).
- `compare`: CHECK, our rules in a dump against the wanted ones, in words.
- `tproxy_routes`: TPROXY mode's policy routing as `ip -batch` lines, and judging ip's answers.

Running them in a netns (save/restore, locks, rollback) is cni.kernel's job.
"""
