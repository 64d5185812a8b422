"""Validate a pod's ``traffic.sidecar.istio.io/*`` annotations (and ``sidecar.istio.io/interceptionMode``)
into a ``SidecarSpec``. Pure.

Accepted syntax (as Istio accepts it): comma-separated lists, whitespace around an entry is trimmed;
ports are 1-65535 in ASCII digits; CIDRs are strict (no host bits) and must carry a prefix length;
``*`` alone is allowed for includeInboundPorts and includeOutboundIPRanges; an empty value means "none"
(for the include annotations: capture nothing). Everything else is rejected with a message that names
the annotation and the offending entry: spaces inside entries, shell metacharacters, empty entries,
more than MAX_ENTRIES entries, values longer than MAX_VALUE_LEN.
The contract ports 15020/15021/15090 always stay excluded from inbound capture (and 15008, the proxy's
HBONE port, is never captured: the rule builders see to it).
``includeOutboundPorts`` is a port list (no ``*``); ``excludeInterfaces`` and ``kubevirtInterfaces`` (or its
newer name ``istio.io/reroute-virtual-interfaces``, which wins when both are set) are lists of interface
names as Istio validates them: a letter, then letters, digits, ``_``, ``.`` or ``-``, at most 15 characters.
``sidecar.istio.io/interceptionMode`` is exactly ``REDIRECT`` (the default) or ``TPROXY`` here; ``NONE``
(Istio's "no interception") never reaches a spec: ``cni.contract.membership`` makes such a pod a
pass-through pod. Anything else is rejected.
"""

from __future__ import annotations

from cni.contract.constants import INTERCEPTION_MODES, SIDECAR_EXCLUDED_INBOUND
from cni.contract.errors import INVALID_ANNOTATION, CniError
from cni.contract.sidecar_params import SidecarParams

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:  # no re/ipaddress/collections at import: the CNI plugin imports this for sidecar pods
    from collections.abc import Mapping

    from cni.contract.kinds import InterceptionMode, IPNetwork
    from cni.contract.spec import SidecarSpec

PREFIX = "traffic.sidecar.istio.io/"
INCLUDE_INBOUND_PORTS = PREFIX + "includeInboundPorts"
EXCLUDE_INBOUND_PORTS = PREFIX + "excludeInboundPorts"
EXCLUDE_OUTBOUND_PORTS = PREFIX + "excludeOutboundPorts"
EXCLUDE_OUTBOUND_IP_RANGES = PREFIX + "excludeOutboundIPRanges"
INCLUDE_OUTBOUND_IP_RANGES = PREFIX + "includeOutboundIPRanges"
INCLUDE_OUTBOUND_PORTS = PREFIX + "includeOutboundPorts"
EXCLUDE_INTERFACES = PREFIX + "excludeInterfaces"
KUBEVIRT_INTERFACES = PREFIX + "kubevirtInterfaces"
REROUTE_VIRTUAL_INTERFACES = "istio.io/reroute-virtual-interfaces"  # kubevirtInterfaces' newer name
INTERCEPTION_MODE = "sidecar.istio.io/interceptionMode"
KNOWN = (
    INTERCEPTION_MODE,
    INCLUDE_INBOUND_PORTS,
    EXCLUDE_INBOUND_PORTS,
    EXCLUDE_OUTBOUND_PORTS,
    EXCLUDE_OUTBOUND_IP_RANGES,
    INCLUDE_OUTBOUND_IP_RANGES,
    INCLUDE_OUTBOUND_PORTS,
    EXCLUDE_INTERFACES,
    KUBEVIRT_INTERFACES,
    REROUTE_VIRTUAL_INTERFACES,
)

MAX_ENTRIES = 256
MAX_VALUE_LEN = 16384
_DIGITS = frozenset("0123456789")
_CIDR_CHARS = frozenset("0123456789ABCDEFabcdef.:/")
_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_IFNAME_CHARS = _LETTERS | _DIGITS | frozenset("_.-")
IFNAME_MAX = 15  # IFNAMSIZ - 1


def _is_port_text(entry: str) -> bool:
    """``[0-9]{1,5}`` (full match)."""
    return 0 < len(entry) <= 5 and _DIGITS.issuperset(entry)


def _is_cidr_text(entry: str) -> bool:
    """``[0-9A-Fa-f.:/]+`` (full match)."""
    return bool(entry) and _CIDR_CHARS.issuperset(entry)


def _fail(annotation: str, token: str, why: str) -> CniError:
    shown = token if len(token) <= 64 else token[:64] + "..."
    if annotation.endswith("Ports"):
        what = " of ports 1-65535"
    elif annotation.endswith(("Interfaces", "interfaces")):
        what = f" of interface names (a letter, then letters, digits, '_', '.', '-'; at most {IFNAME_MAX})"
    else:
        what = " of CIDRs like 10.0.0.0/8"
    return CniError(
        INVALID_ANNOTATION,
        f"invalid annotation {annotation}: bad entry {shown!r}: {why}",
        "expected a comma-separated list" + what,
    )


def _tokens(annotation: str, value: str) -> list[str]:
    if len(value) > MAX_VALUE_LEN:
        raise _fail(annotation, value, f"value longer than {MAX_VALUE_LEN} characters")
    if value.strip() == "":
        if value != "":
            raise _fail(annotation, value, "blank value")
        return []
    pieces = value.split(",")
    if len(pieces) > MAX_ENTRIES:
        raise _fail(annotation, value, f"more than {MAX_ENTRIES} entries")
    out: list[str] = []
    for piece in pieces:
        token = piece.strip(" \t")
        if token == "":
            raise _fail(annotation, piece, "empty entry")
        out.append(token)
    return out


def parse_ports(annotation: str, value: str, allow_star: bool = False) -> tuple[int, ...] | None:
    """A port list; None for '*' (where allowed). Sorted, without duplicates."""
    tokens = _tokens(annotation, value)
    if allow_star and tokens == ["*"]:
        return None
    ports: set[int] = set()
    for entry in tokens:
        if entry == "*":
            raise _fail(annotation, entry, "'*' must be the whole value" if allow_star else "'*' not allowed")
        if not _is_port_text(entry):
            raise _fail(annotation, entry, "not a port number")
        port = int(entry)
        if not 1 <= port <= 65535:
            raise _fail(annotation, entry, "port out of range 1-65535")
        ports.add(port)
    return tuple(sorted(ports))


def parse_cidrs(annotation: str, value: str, allow_star: bool = False) -> tuple[IPNetwork, ...] | None:
    """A CIDR list; None for '*' (where allowed). Strict: host bits set, bare addresses are errors."""
    tokens = _tokens(annotation, value)
    if allow_star and tokens == ["*"]:
        return None
    nets: list[IPNetwork] = []
    for entry in tokens:
        if entry == "*":
            raise _fail(annotation, entry, "'*' must be the whole value" if allow_star else "'*' not allowed")
        if not _is_cidr_text(entry):
            raise _fail(annotation, entry, "not a CIDR (unexpected characters)")
        if entry.count("/") != 1:
            raise _fail(annotation, entry, "a CIDR needs exactly one '/prefix'")
        import ipaddress  # only pods with range annotations pay for it

        try:
            net = ipaddress.ip_network(entry, strict=True)
        except ValueError as exc:
            raise _fail(annotation, entry, str(exc)) from exc
        if net not in nets:
            nets.append(net)
    return tuple(nets)


def parse_interfaces(annotation: str, value: str) -> tuple[str, ...]:
    """An interface-name list (Istio's rule: ``[a-zA-Z][a-zA-Z0-9_.-]*``, at most 15 characters), in the
    given order without duplicates; empty value = none."""
    names: list[str] = []
    for entry in _tokens(annotation, value):
        if entry == "*":
            raise _fail(annotation, entry, "'*' not allowed: name each interface")
        if len(entry) > IFNAME_MAX:
            raise _fail(annotation, entry, f"interface name longer than {IFNAME_MAX} characters")
        if entry[0] not in _LETTERS or not _IFNAME_CHARS.issuperset(entry):
            raise _fail(annotation, entry, "not an interface name")
        if entry not in names:
            names.append(entry)
    return tuple(names)


def parse_interception_mode(value: str) -> InterceptionMode:
    """``REDIRECT`` or ``TPROXY``, spelled exactly so (as Istio's validation wants)."""
    for mode in INTERCEPTION_MODES:
        if value == mode:
            return mode
    shown = value if len(value) <= 64 else value[:64] + "..."
    why = "unknown mode"
    if value == "NONE":  # membership.pod_mode makes such a pod a pass-through pod before any spec
        why = "NONE means no redirection at all, not a spec"
    raise CniError(
        INVALID_ANNOTATION,
        f"invalid annotation {INTERCEPTION_MODE}: {shown!r}: {why}",
        "expected REDIRECT (the default) or TPROXY",
    )


def sidecar_spec(annotations: Mapping[str, str], base: SidecarSpec | None = None) -> SidecarSpec:
    """The sidecar redirect for a pod, from the contract defaults plus its traffic annotations."""
    from cni.contract.spec import SidecarSpec

    params = sidecar_params(annotations, base)
    return SidecarSpec(
        proxy_uid=params.proxy_uid,
        proxy_gid=params.proxy_gid,
        outbound_port=params.outbound_port,
        inbound_port=params.inbound_port,
        include_inbound_ports=params.include_inbound_ports,
        exclude_inbound_ports=params.exclude_inbound_ports,
        exclude_outbound_ports=params.exclude_outbound_ports,
        exclude_outbound_ranges=params.exclude_outbound_ranges,
        include_outbound_ranges=params.include_outbound_ranges,
        interception_mode=params.interception_mode,
        include_outbound_ports=params.include_outbound_ports,
        exclude_interfaces=params.exclude_interfaces,
        kubevirt_interfaces=params.kubevirt_interfaces,
    )


def sidecar_params(annotations: Mapping[str, str], base: SidecarSpec | SidecarParams | None = None) -> SidecarParams:
    """``sidecar_spec`` without the dataclass (the CNI plugin's hot path): same validation, same values."""
    spec = base or SidecarParams()
    include_in: tuple[int, ...] | None = spec.include_inbound_ports
    exclude_in = set(spec.exclude_inbound_ports) | set(SIDECAR_EXCLUDED_INBOUND)
    exclude_out = spec.exclude_outbound_ports
    exclude_ranges = spec.exclude_outbound_ranges
    include_ranges = spec.include_outbound_ranges
    mode = spec.interception_mode
    include_out = spec.include_outbound_ports
    exclude_ifs = spec.exclude_interfaces
    kubevirt_ifs = spec.kubevirt_interfaces
    if INTERCEPTION_MODE in annotations:
        mode = parse_interception_mode(annotations[INTERCEPTION_MODE])
    if INCLUDE_INBOUND_PORTS in annotations:
        include_in = parse_ports(INCLUDE_INBOUND_PORTS, annotations[INCLUDE_INBOUND_PORTS], allow_star=True)
    if EXCLUDE_INBOUND_PORTS in annotations:
        exclude_in |= set(parse_ports(EXCLUDE_INBOUND_PORTS, annotations[EXCLUDE_INBOUND_PORTS]) or ())
    if EXCLUDE_OUTBOUND_PORTS in annotations:
        exclude_out = parse_ports(EXCLUDE_OUTBOUND_PORTS, annotations[EXCLUDE_OUTBOUND_PORTS]) or ()
    if EXCLUDE_OUTBOUND_IP_RANGES in annotations:
        exclude_ranges = parse_cidrs(EXCLUDE_OUTBOUND_IP_RANGES, annotations[EXCLUDE_OUTBOUND_IP_RANGES]) or ()
    if INCLUDE_OUTBOUND_IP_RANGES in annotations:
        include_ranges = parse_cidrs(
            INCLUDE_OUTBOUND_IP_RANGES, annotations[INCLUDE_OUTBOUND_IP_RANGES], allow_star=True
        )
    if INCLUDE_OUTBOUND_PORTS in annotations:
        include_out = parse_ports(INCLUDE_OUTBOUND_PORTS, annotations[INCLUDE_OUTBOUND_PORTS]) or ()
    if EXCLUDE_INTERFACES in annotations:
        exclude_ifs = parse_interfaces(EXCLUDE_INTERFACES, annotations[EXCLUDE_INTERFACES])
    for key in (KUBEVIRT_INTERFACES, REROUTE_VIRTUAL_INTERFACES):  # validate both; the newer name wins
        if key in annotations:
            kubevirt_ifs = parse_interfaces(key, annotations[key])
    if include_in is not None:
        include_in = tuple(p for p in include_in if p not in exclude_in)
    return SidecarParams(
        proxy_uid=spec.proxy_uid,
        proxy_gid=spec.proxy_gid,
        outbound_port=spec.outbound_port,
        inbound_port=spec.inbound_port,
        include_inbound_ports=include_in,
        exclude_inbound_ports=tuple(sorted(exclude_in)),
        exclude_outbound_ports=exclude_out,
        exclude_outbound_ranges=exclude_ranges,
        include_outbound_ranges=include_ranges,
        interception_mode=mode,
        include_outbound_ports=include_out,
        exclude_interfaces=exclude_ifs,
        kubevirt_interfaces=kubevirt_ifs,
    )
