"""Pure iptables rule builder: redirect specs + address family → rules in iptables-save canonical syntax.

The public face of the rule modules (what the kernel layer, the agent's backend and the tests use):

- `rule_text`: the canonical rule text (each rule names its purpose in a `headrace: ...` comment), the
  `RuleSet` / `TableRules` records and the validation of the values that go into rules;
- `sidecar`: istio-iptables compatible sidecar interception, REDIRECT and TPROXY mode;
- `ambient`: the in-pod interception for the node proxy;
- `node_probe`: the node-side SNAT of kubelet probes.

Nothing here touches the kernel. Chains (all prefixed `HEADRACE_`, so removal finds exactly ours):
- sidecar (nat): HEADRACE_SC_INBOUND, HEADRACE_SC_IN_REDIRECT, HEADRACE_SC_OUTPUT, HEADRACE_SC_REDIRECT
- sidecar TPROXY mode (mangle): HEADRACE_SC_PRERT, HEADRACE_SC_INBOUND, HEADRACE_SC_DIVERT, HEADRACE_SC_TPROXY,
  HEADRACE_SC_OUTPUT (the nat table then keeps only the outbound part: no nat HEADRACE_SC_INBOUND)
- ambient (nat and mangle): HEADRACE_AM_PRERT, HEADRACE_AM_OUTPUT
- node side (nat, the agent's netns): HEADRACE_POSTROUTING
"""

from __future__ import annotations

from cni.rules.ambient import AM_OUTPUT, AM_PRERT, AMBIENT_PREFIX, CONNMARK_PROXY, DNS_PORT, ambient_rules
from cni.rules.node_probe import NODE_CHAIN, node_probe_rules, parse_pod_ips
from cni.rules.rule_text import (
    ANY_ADDRESS,
    COMMENT_PREFIX,
    LOOPBACK,
    OWNED_PREFIX,
    PASSTHROUGH_SOURCE,
    RuleSet,
    TableRules,
    comment,
    rule,
)
from cni.rules.sidecar import (
    SC_DIVERT,
    SC_IN_REDIRECT,
    SC_INBOUND,
    SC_OUTPUT,
    SC_PRERT,
    SC_REDIRECT,
    SC_TPROXY,
    SIDECAR_PREFIX,
    interception_mode,
    sidecar_rules,
    uses_tproxy,
)

__all__ = [
    "AMBIENT_PREFIX",
    "AM_OUTPUT",
    "AM_PRERT",
    "ANY_ADDRESS",
    "COMMENT_PREFIX",
    "CONNMARK_PROXY",
    "DNS_PORT",
    "LOOPBACK",
    "NODE_CHAIN",
    "OWNED_PREFIX",
    "PASSTHROUGH_SOURCE",
    "SC_DIVERT",
    "SC_INBOUND",
    "SC_IN_REDIRECT",
    "SC_OUTPUT",
    "SC_PRERT",
    "SC_REDIRECT",
    "SC_TPROXY",
    "SIDECAR_PREFIX",
    "RuleSet",
    "TableRules",
    "ambient_rules",
    "comment",
    "interception_mode",
    "node_probe_rules",
    "parse_pod_ips",
    "rule",
    "sidecar_rules",
    "uses_tproxy",
]
