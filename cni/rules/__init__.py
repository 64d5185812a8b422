"""iptables rules of headrace, built as text (pure) plus the TPROXY policy routing lines.

Stdlib only: the CNI plugin imports this package on its hot path.

- `builder`: the public face: SidecarSpec / AmbientSpec / node probe IPs + address family → rules.
- `rule_text`: iptables-save canonical rule text (each rule carries a `headrace: <purpose>` comment), the
  RuleSet / TableRules records, validation of rule values.
- `sidecar`, `ambient`, `node_probe`: the rule sets of each kind.
- `tproxy_routes`: the `ip -batch` lines of TPROXY mode's policy routing, and how to judge ip's answers.

Applying them in a netns is `cni.kernel.tables`' job.
"""
