"""The prevResult a chained plugin receives: validation, version conversion, and the facts we need.

headrace-cni never changes the result; it only converts it to the cniVersion the runtime asked for
(0.4.0 <-> 1.0.0 <-> 1.1.0). The same version passes through untouched (unknown keys included); a
conversion keeps the fields the target version defines (like libcni's typed conversion does).
"""

from __future__ import annotations

from cni.contract.errors import INVALID_NETWORK_CONFIG, CniError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from typing import Any

    from cni.contract.kinds import Family

READABLE_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

_IFACE_FIELDS_04 = ("name", "mac", "sandbox")
_IFACE_FIELDS_11 = (*_IFACE_FIELDS_04, "mtu", "socketPath", "pciID")
_ROUTE_FIELDS_04 = ("dst", "gw")
_ROUTE_FIELDS_11 = (*_ROUTE_FIELDS_04, "mtu", "advmss", "priority", "table", "scope")
_DNS_FIELDS = ("nameservers", "domain", "search", "options")


_DIGITS = frozenset("0123456789")
_HEX = frozenset("0123456789abcdefABCDEF")


def _plain_ipv4(text: str) -> bool:
    """Dotted decimal without leading zeros (a subset of what ``ipaddress`` accepts)."""
    parts = text.split(".")
    return len(parts) == 4 and all(
        0 < len(p) <= 3 and _DIGITS.issuperset(p) and (p == "0" or p[0] != "0") and int(p) <= 255 for p in parts
    )


def _plain_ipv6(text: str) -> bool:
    """Hex groups, at most one ``::``, no embedded IPv4 or zone (a subset of what ``ipaddress`` accepts)."""
    head, sep, tail = text.partition("::")
    if sep and "::" in tail:
        return False
    groups = [g for part in (head, tail) if part for g in part.split(":")]
    if not all(0 < len(g) <= 4 and _HEX.issuperset(g) for g in groups):
        return False
    return len(groups) <= 7 if sep else len(groups) == 8


def ip_version(address: str) -> int:
    """The IP version of an ``address[/prefix]`` string; ValueError exactly when
    ``ipaddress.ip_interface`` refuses it. The plain forms CNI plugins write are recognised with str
    methods; anything else is left to ``ipaddress`` (imported only then: it costs milliseconds)."""
    addr, sep, prefix = address.partition("/")
    prefix_ok = not sep or (0 < len(prefix) <= 3 and _DIGITS.issuperset(prefix))
    if prefix_ok and _plain_ipv4(addr) and (not sep or int(prefix) <= 32):
        return 4
    if prefix_ok and _plain_ipv6(addr) and (not sep or int(prefix) <= 128):
        return 6
    import ipaddress

    return ipaddress.ip_interface(address).version


def _ip_address(text: str) -> None:
    """ValueError exactly when ``ipaddress.ip_address`` refuses ``text`` (plain forms without import)."""
    if _plain_ipv4(text) or _plain_ipv6(text):
        return
    import ipaddress

    ipaddress.ip_address(text)


def _copy_json(value: Any) -> Any:
    """A deep copy of a JSON value (``copy.deepcopy`` for anything that is not plain JSON)."""
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_json(v) for v in value]
    if value is None or isinstance(value, str | int | float):
        return value
    import copy

    return copy.deepcopy(value)


def _bad(msg: str) -> CniError:
    return CniError(INVALID_NETWORK_CONFIG, f"invalid prevResult: {msg}")


def validate(result: dict[str, Any], config_version: str) -> str:
    """Check the shape we rely on; return the version the result is written in."""
    version = result.get("cniVersion", config_version)
    if not isinstance(version, str) or version not in READABLE_VERSIONS:
        raise _bad(f"unsupported cniVersion {str(version)[:20]!r}")
    interfaces = result.get("interfaces", [])
    if not isinstance(interfaces, list) or not all(isinstance(i, dict) for i in interfaces):
        raise _bad("'interfaces' must be a list of objects")
    for iface in interfaces:
        if "name" in iface and not isinstance(iface["name"], str):
            raise _bad("interface 'name' must be a string")
    ips = result.get("ips", [])
    if not isinstance(ips, list):
        raise _bad("'ips' must be a list")
    for ip in ips:
        if not isinstance(ip, dict):
            raise _bad("'ips' entries must be objects")
        address = ip.get("address")
        if not isinstance(address, str):
            raise _bad("every ip needs an 'address' string")
        try:
            address_version = ip_version(address)
        except ValueError as exc:
            raise _bad(f"ip address {address[:60]!r} is not an address/prefix") from exc
        if "/" not in address:
            raise _bad(f"ip address {address[:60]!r} has no prefix length")
        gateway = ip.get("gateway")
        if gateway is not None:
            try:
                _ip_address(gateway if isinstance(gateway, str) else "x")
            except ValueError as exc:
                raise _bad(f"gateway {str(gateway)[:60]!r} is not an IP address") from exc
        index = ip.get("interface")
        if index is not None and (
            isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(interfaces)
        ):
            raise _bad(f"ip 'interface' index {index!r} does not point into 'interfaces'")
        if version.startswith("0.") and "version" in ip and ip["version"] != str(address_version):
            raise _bad(f"ip 'version' {ip['version']!r} does not match {address[:60]!r}")
    routes = result.get("routes", [])
    if not isinstance(routes, list) or not all(isinstance(r, dict) for r in routes):
        raise _bad("'routes' must be a list of objects")
    dns = result.get("dns", {})
    if not isinstance(dns, dict):
        raise _bad("'dns' must be an object")
    return version


def addresses(result: dict[str, Any]) -> list[str]:
    """The pod's IP addresses (no prefix length), in prevResult order. Entries without a valid address
    are left out (ADD and CHECK validated the prevResult already; DEL takes it as it comes)."""
    import ipaddress  # only the agent paths need the canonical text

    ips = result.get("ips")
    out: list[str] = []
    for ip in ips if isinstance(ips, list) else []:
        try:
            out.append(str(ipaddress.ip_interface(ip["address"]).ip))
        except (TypeError, KeyError, ValueError):
            continue
    return out


def families(result: dict[str, Any]) -> tuple[Family, ...]:
    """Address families of the pod's IPs; both when the result holds no IP (capture rather than leak)."""
    found = {ip_version(ip["address"]) for ip in result.get("ips", [])}
    out: tuple[Family, ...] = tuple(f for f in (4, 6) if f in found)
    return out or (4, 6)


def _pick(obj: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: _copy_json(obj[k]) for k in keys if k in obj}


def convert(result: dict[str, Any], source_version: str, target_version: str) -> dict[str, Any]:
    """The same result expressed in ``target_version``."""
    if source_version == target_version:
        same: dict[str, Any] = _copy_json(result)
        same["cniVersion"] = target_version
        return same
    old_target = target_version.startswith("0.")
    iface_fields = _IFACE_FIELDS_11 if target_version == "1.1.0" else _IFACE_FIELDS_04
    route_fields = _ROUTE_FIELDS_11 if target_version == "1.1.0" else _ROUTE_FIELDS_04
    out: dict[str, Any] = {"cniVersion": target_version}
    if "interfaces" in result:
        out["interfaces"] = [_pick(i, iface_fields) for i in result["interfaces"]]
    if "ips" in result:
        ips = []
        for ip in result["ips"]:
            entry = _pick(ip, ("interface", "address", "gateway"))
            if old_target:
                version = str(ip_version(ip["address"]))
                entry = {"version": version, **entry}
            ips.append(entry)
        out["ips"] = ips
    if "routes" in result:
        out["routes"] = [_pick(r, route_fields) for r in result["routes"]]
    if "dns" in result:
        out["dns"] = _pick(result["dns"], _DNS_FIELDS)
    return out
