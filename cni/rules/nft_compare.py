"""Read `nft list table` text back and compare it with the table the builder wants (CHECK, drift). Pure.

The builder writes the canonical listing (`nft_text`), so an intact table lists exactly the builder's
text; the differences are reported per chain, in words a person can act on.
"""

from __future__ import annotations

from cni.rules.nft_text import TABLE_FAMILY

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from cni.rules.nft_text import NftTable

ListedChains = dict[str, tuple[str | None, list[str]]]


def parse_listing(text: str) -> ListedChains:
    """`nft list table` output → chain name → (base-chain hook line without `; policy ...;`, rule lines).
    Handles (`# handle N`) are dropped, should the listing carry them."""
    chains: ListedChains = {}
    current: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("table ") or line == "}":
            if line == "}":
                current = None
            continue
        if line.startswith("chain ") and line.endswith("{"):
            current = line[len("chain ") : -1].strip()
            chains[current] = (None, [])
            continue
        if current is None:
            continue
        line = line.split(" # handle ", 1)[0]
        if line.startswith("type ") and " hook " in line:
            hook = line.split(";", 1)[0]
            chains[current] = (hook, chains[current][1])
            continue
        chains[current][1].append(line)
    return chains


def changed_policies(text: str) -> dict[str, str]:
    """Base chains of a listing whose policy is not accept (ours are all accept): chain → policy."""
    out: dict[str, str] = {}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("chain ") and line.endswith("{"):
            current = line[len("chain ") : -1].strip()
        elif line.startswith("type ") and "; policy " in line:
            policy = line.split("; policy ", 1)[1].split(";", 1)[0].strip()
            if policy != "accept":
                out[current] = policy
    return out


def compare(listing: str | None, want: NftTable) -> list[str]:
    """Problems between what nft lists (None: no table at all) and `want`; empty when they match."""
    where = f"table {TABLE_FAMILY} {want.name}"
    if listing is None:
        return [f"{where} is missing"]
    have = parse_listing(listing)
    problems: list[str] = []
    for chain in want.chains:
        if chain.name not in have:
            problems.append(f"{where}: chain {chain.name} is missing")
            continue
        hook, rules = have[chain.name]
        if hook != chain.hook:
            problems.append(f"{where}: chain {chain.name} hooks {hook or 'nothing'}, want {chain.hook or 'nothing'}")
        wanted = list(chain.rules)
        if rules == wanted:
            continue
        missing = [r for r in wanted if r not in rules]
        extra = [r for r in rules if r not in wanted]
        problems.extend(f"{where}: chain {chain.name}: missing rule: {r}" for r in missing)
        problems.extend(f"{where}: chain {chain.name}: unexpected rule: {r}" for r in extra)
        if not missing and not extra:
            problems.append(f"{where}: chain {chain.name}: rules out of order or duplicated")
    problems.extend(f"{where}: chain {name} has policy {policy}, want accept"
                    for name, policy in changed_policies(listing).items())
    wanted_names = {c.name for c in want.chains}
    problems.extend(f"{where}: unexpected chain {name}" for name in have if name not in wanted_names)
    return problems
