"""Whether iptables-nft's tables in a pod netns hold nothing but our rules, from `nft -j list ruleset`.

The in-process removal of a pod's iptables rules on nft hosts deletes iptables-nft's tables of the pod's
spec whole (`fresh_remove`). Right after the agent's own fresh write it knows they hold nothing else; for a
pod it did not write since its start (its rules found intact after a restart, or rewritten by a repair) it
reads the ruleset instead, and the tables may go only when each holds nothing but:

- iptables' built-in base chains of that table (`PREROUTING`, `OUTPUT`, ...) with an accepting policy,
  whose every rule ends in a jump into one of our chains;
- our chains (`HEADRACE_*`), whatever their rules.

Anything else there (another chain, a rule of someone else's in a base chain, a set, a map, a flowtable, a
stateful object), a table of the spec missing, or a chain of ours in another iptables-nft table (rules of
another spec than the one the caller knows): the removal takes `iptables-restore` instead, which keeps
what is not ours and finds all of ours. Pure: the caller lists the ruleset and deletes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from cni.rules.rule_text import OWNED_PREFIX
from node_agent.backends.nft_foreign import jumps_to_ours

BUILTIN = {
    "nat": frozenset({"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"}),
    "mangle": frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}),
}
FAMILY_NAMES = {4: "ip", 6: "ip6"}


def not_ours_alone(listing: str, tables: Iterable[tuple[int, str]]) -> str | None:
    """None when every table of `tables` ((family, name)) is in the listing and holds nothing but iptables'
    base chains with our jumps and our chains; else why not (the first thing found)."""
    try:
        items = json.loads(listing).get("nftables", [])
    except (ValueError, AttributeError) as exc:
        return f"the ruleset listing is unreadable: {exc}"
    wanted = {(FAMILY_NAMES.get(family, "?"), name) for family, name in tables}
    seen: set[tuple[str, str]] = set()
    base: set[tuple[str, str, str]] = set()
    rules: list[dict[str, Any]] = []
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict) or len(item) != 1:
            continue
        ((kind, body),) = item.items()
        if kind == "metainfo" or not isinstance(body, dict):
            continue
        family = str(body.get("family"))
        if kind == "table":
            if (family, str(body.get("name"))) in wanted:
                seen.add((family, str(body.get("name"))))
            continue
        table = str(body.get("table"))
        if (family, table) not in wanted:
            if kind == "chain" and family in ("ip", "ip6") and str(body.get("name")).startswith(OWNED_PREFIX):
                return f"{family} {table} holds chain {body.get('name')} of ours too"  # another spec's
            continue
        where = f"{family} {table}"
        if kind == "rule":
            rules.append(body)
        elif kind != "chain":
            return f"{where} holds a {kind}"
        elif "hook" in body:
            name = str(body.get("name"))
            if name not in BUILTIN.get(table, ()) or body.get("policy", "accept") != "accept":
                return f"{where} holds base chain {name} (policy {body.get('policy', 'accept')})"
            base.add((family, table, name))
        elif not str(body.get("name")).startswith(OWNED_PREFIX):
            return f"{where} holds chain {body.get('name')}"
    if seen != wanted:
        return f"table {', '.join(' '.join(t) for t in sorted(wanted - seen))} is not there"
    for rule in rules:
        key = (str(rule.get("family")), str(rule.get("table")), str(rule.get("chain")))
        if key in base and not jumps_to_ours(rule.get("expr")):
            return f"{' '.join(key)} holds a rule that is not a jump of ours"
    return None

