"""The sidecar rules that depend on a pod's interfaces (istio-iptables' excludeInterfaces and
kubevirtInterfaces), in our own chains. Pure.

- excluded interfaces: traffic arriving on them is not captured inbound (`-i IF -j RETURN` first in the
  inbound chain), traffic leaving via them is not captured outbound (`-o IF -j RETURN` first in the
  output chain); istio-iptables puts the same RETURNs at the top of the built-in PREROUTING and OUTPUT
  chains, which for the pod's own rules means the same.
- kubevirt interfaces: TCP arriving on them is a VM's outbound traffic routed through the pod: it goes to
  the outbound redirect (every destination, or only the include ranges when those are a list; nothing
  when they are empty), and the rest returns uncaptured.
"""

from __future__ import annotations

from cni.rules.rule_text import rule

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Iterable

IFNAME_MAX = 15
_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_IFNAME_CHARS = _LETTERS | frozenset("0123456789_.-")


def check_interfaces(names: Iterable[object], what: str) -> tuple[str, ...]:
    """Interface names as Istio accepts them (a letter, then letters, digits, '_', '.', '-'; at most 15
    characters), without duplicates, in order."""
    out: list[str] = []
    for name in names:
        if (
            not isinstance(name, str)
            or not 0 < len(name) <= IFNAME_MAX
            or name[0] not in _LETTERS
            or not _IFNAME_CHARS.issuperset(name)
        ):
            raise ValueError(f"{what}: not an interface name: {name!r}")
        if name not in out:
            out.append(name)
    return tuple(out)


def excluded_in_rules(chain: str, interfaces: tuple[str, ...]) -> list[str]:
    return [rule(chain, in_if=i, purpose="skip excluded interface", target="RETURN") for i in interfaces]


def excluded_out_rules(chain: str, interfaces: tuple[str, ...]) -> list[str]:
    return [rule(chain, out_if=i, purpose="skip excluded interface", target="RETURN") for i in interfaces]


def kubevirt_rules(
    chain: str, redirect_chain: str | None, interfaces: tuple[str, ...], include_ranges: tuple[str, ...] | None
) -> list[str]:
    """Per kubevirt interface: its traffic to the outbound redirect (redirect_chain; None = no redirect,
    only the return), then a return for the rest."""
    out: list[str] = []
    for name in interfaces:
        if redirect_chain is not None:
            if include_ranges is None:
                out.append(rule(chain, in_if=name, purpose="kubevirt interface outbound", target=redirect_chain))
            for net in include_ranges or ():
                out.append(
                    rule(chain, dst=net, in_if=name, purpose="kubevirt interface outbound range", target=redirect_chain)
                )
        out.append(rule(chain, in_if=name, purpose="kubevirt interface not inbound", target="RETURN"))
    return out
