"""Pure: a redirect spec -> the per-pod map contents the programs read (layouts of bpf/headrace_redirect.h).

Also splits a spec into its inbound part, for a backend configured to hand inbound capture to a fallback
(kernels without bpf_sk_assign) instead of half-redirecting.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
import json
import struct
from dataclasses import dataclass

from cni.contract.constants import SIDECAR_HBONE_PORT
from cni.contract.kinds import IPNetwork
from cni.contract.spec import AmbientSpec, SidecarSpec

MODE_SIDECAR = 1
MODE_AMBIENT = 2
INBOUND_NONE = 0
INBOUND_ALL = 1
INBOUND_LISTED = 2
CONFIG_FMT = "=IIIIHHBBBBQQHHI16sIII16sIHHI"  # struct hr_config (104 bytes)
CONFIG_SIZE = struct.calcsize(CONFIG_FMT)
LPM_FMT = "=I16s"  # struct hr_lpm_key
PORT_FMT = "=H"
ALL_V4 = ipaddress.IPv4Network("0.0.0.0/0")
ALL_V6 = ipaddress.IPv6Network("::/0")

Spec = SidecarSpec | AmbientSpec


@dataclass(frozen=True)
class PodMaps:
    """Entries of the per-pod maps (keys/values packed as the C structs)."""

    config: bytes
    exclude_ports: tuple[bytes, ...]
    exclude_nets: tuple[bytes, ...]
    include_nets: tuple[bytes, ...]
    exclude_inbound: tuple[bytes, ...]
    include_inbound: tuple[bytes, ...]
    local_addrs: tuple[bytes, ...]
    generation: int
    include_ports: tuple[bytes, ...] = ()


def _enc(v: object) -> object:
    if isinstance(v, tuple):
        return [_enc(x) for x in v]
    if isinstance(v, (ipaddress.IPv4Network, ipaddress.IPv6Network, ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(v)
    return v


@functools.lru_cache(maxsize=256)
def _spec_doc(spec: Spec) -> tuple[tuple[str, object], ...]:
    """The spec's fields as generation_of hashes them (encoded once per spec: most of its cost)."""
    return (("kind", type(spec).__name__), *((f.name, _enc(getattr(spec, f.name))) for f in dataclasses.fields(spec)))


def generation_of(spec: Spec, *extra: object) -> int:
    """A stable 63-bit hash of the spec (and extra inputs), stored in the config map: what is installed."""
    doc = dict(_spec_doc(spec))
    if extra:
        doc["extra"] = [_enc(x) for x in extra]
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def lpm_key(net: IPNetwork) -> bytes:
    """IPv4 ranges live in the IPv4-mapped IPv6 space (::ffff:0:0/96), as the programs look them up."""
    if net.version == 4:
        addr = b"\0" * 10 + b"\xff\xff" + net.network_address.packed
        return struct.pack(LPM_FMT, 96 + net.prefixlen, addr)
    return struct.pack(LPM_FMT, net.prefixlen, net.network_address.packed)


def _check_port(p: int, what: str) -> int:
    if not isinstance(p, int) or not 1 <= p <= 65535:
        raise ValueError(f"{what} {p!r} is not a TCP port (1-65535)")
    return p


def inbound_ports(spec: Spec) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """(inbound mode, excluded ports, included ports) as the TC ingress program applies them."""
    incl: tuple[int, ...]
    excl: set[int]
    if isinstance(spec, SidecarSpec):
        excl = {*spec.exclude_inbound_ports, SIDECAR_HBONE_PORT}  # HBONE: never captured (as istio-iptables)
        if spec.include_inbound_ports is None:
            mode, incl = INBOUND_ALL, ()
        elif spec.include_inbound_ports:
            mode, incl = INBOUND_LISTED, tuple(spec.include_inbound_ports)
        else:
            mode, incl = INBOUND_NONE, ()
    else:
        mode, incl = INBOUND_ALL, ()
        excl = {*spec.exclude_inbound_ports, spec.hbone_port}
    excl_t = tuple(sorted({_check_port(p, "excluded inbound port") for p in excl}))
    incl_t = tuple(sorted({_check_port(p, "included inbound port") for p in incl}))
    return mode, excl_t, incl_t


def local_addresses(ips: tuple[str, ...]) -> tuple[str, ...]:
    """The pod's own addresses from PodTarget.ips ("10.1.2.3/24" or "10.1.2.3"), normalised and sorted."""
    out: set[str] = set()
    for ip in ips:
        try:
            out.add(str(ipaddress.ip_interface(ip).ip))
        except ValueError:
            raise ValueError(f"invalid pod IP {ip!r}") from None
    return tuple(sorted(out))


FAM_V4 = 1
FAM_V6 = 2


def families_mask(ips: tuple[str, ...]) -> int:
    """HR_FAM_* bits of the families among the pod's IPs (0 = both: IPs unknown), as the iptables backend
    installs rules only for the families a pod has."""
    mask = 0
    for ip in ips:
        try:
            mask |= FAM_V4 if ipaddress.ip_interface(ip).version == 4 else FAM_V6
        except ValueError:
            raise ValueError(f"invalid pod IP {ip!r}") from None
    return mask


def self_addresses(ips: tuple[str, ...]) -> tuple[ipaddress.IPv4Address | None, ipaddress.IPv6Address | None]:
    """The first IPv4 and first IPv6 address of PodTarget.ips (in the given order): the outbound redirect
    target, so the proxy sees the pod IP as the source (None: that family falls back to loopback)."""
    v4: ipaddress.IPv4Address | None = None
    v6: ipaddress.IPv6Address | None = None
    for ip in ips:
        try:
            addr = ipaddress.ip_interface(ip).ip
        except ValueError:
            raise ValueError(f"invalid pod IP {ip!r}") from None
        if isinstance(addr, ipaddress.IPv4Address):
            if v4 is None and not addr.is_unspecified:
                v4 = addr
        elif v6 is None and not addr.is_unspecified and addr.ipv4_mapped is None:
            v6 = addr
    return v4, v6


@functools.lru_cache(maxsize=4096)
def spec_maps(spec: Spec, inbound_in_ebpf: bool, ips: tuple[str, ...]) -> PodMaps:
    """`pod_maps` before `with_netns` names the pod's cgroup and netns, remembered per input (a node's pods
    share a few specs, and the drift check asks for every pod's generation every interval)."""
    return pod_maps(spec, 0, inbound_in_ebpf=inbound_in_ebpf, ips=ips)


def wanted_generation(spec: Spec, inbound_in_ebpf: bool, ips: tuple[str, ...]) -> int:
    """`pod_maps(...).generation`, for the drift check."""
    return spec_maps(spec, inbound_in_ebpf, ips).generation


@dataclass(frozen=True)
class _SpecPart:
    """What a spec alone makes of a pod's maps (the pod's IPs, netns and cgroup aside)."""

    head: tuple[int, ...]  # struct hr_config's fields ahead of the generation
    inbound_port: int
    probe4: int
    probe6: bytes
    proxy_gid: int
    hbone: int
    sets: PodMaps  # the set entries (config, local addresses and generation left empty)


@functools.lru_cache(maxsize=256)
def _spec_part(spec: Spec, inbound_in_ebpf: bool) -> _SpecPart:
    """The spec's share of `pod_maps`, made once per spec (a node's pods share a few)."""
    if isinstance(spec, SidecarSpec):
        mode, uid, mark, mask = MODE_SIDECAR, spec.proxy_uid, 0, 0
        proxy_gid = spec.proxy_gid
        dns_port, capture_dns = 0, False
        include = spec.include_outbound_ranges
        hbone = SIDECAR_HBONE_PORT
        include_ports = tuple(sorted({_check_port(p, "included outbound port") for p in spec.include_outbound_ports}))
    else:
        mode, uid, mark, mask = MODE_AMBIENT, 0xFFFFFFFF, spec.mark, spec.mark_mask
        proxy_gid = 0xFFFFFFFF
        dns_port, capture_dns = _check_port(spec.dns_port, "dns_port"), spec.capture_dns
        include = None
        hbone = _check_port(spec.hbone_port, "hbone_port")
        include_ports = ()
    if not (0 <= uid <= 0xFFFFFFFF and 0 <= proxy_gid <= 0xFFFFFFFF):
        raise ValueError(f"proxy uid/gid {uid}/{proxy_gid} out of range")
    out_port = _check_port(spec.outbound_port, "outbound_port")
    excl = list(spec.exclude_outbound_ranges)
    if include is None:
        all4 = all6 = True
        inc: list[IPNetwork] = []
    else:
        inc = list(include)
        all4 = any(n == ALL_V4 for n in inc)
        all6 = any(n == ALL_V6 for n in inc)
    in_mode, in_excl, in_incl = inbound_ports(spec)
    if not inbound_in_ebpf:
        in_mode, in_excl, in_incl = INBOUND_NONE, (), ()
    in_port = _check_port(spec.inbound_port, "inbound_port")
    probe4, probe6 = 0, b"\0" * 16
    if isinstance(spec, AmbientSpec):
        probe4 = int.from_bytes(spec.probe_snat_v4.packed, "little")  # network order as the C reads it
        probe6 = spec.probe_snat_v6.packed
    ports = tuple(sorted({_check_port(p, "excluded outbound port") for p in spec.exclude_outbound_ports}))
    head = (mode, uid, mark & 0xFFFFFFFF, mask & 0xFFFFFFFF, out_port, dns_port, 1 if capture_dns else 0,
            1 if all4 else 0, 1 if all6 else 0, in_mode)
    sets = PodMaps(
        config=b"",
        exclude_ports=tuple(struct.pack(PORT_FMT, p) for p in ports),
        exclude_nets=tuple(lpm_key(n) for n in excl),
        include_nets=tuple(lpm_key(n) for n in inc),
        exclude_inbound=tuple(struct.pack(PORT_FMT, p) for p in in_excl),
        include_inbound=tuple(struct.pack(PORT_FMT, p) for p in in_incl),
        local_addrs=(),
        generation=0,
        include_ports=tuple(struct.pack(PORT_FMT, p) for p in include_ports),
    )
    return _SpecPart(head, in_port, probe4, probe6, proxy_gid, hbone, sets)


def pod_maps(spec: Spec, cgroup_id: int, inbound_in_ebpf: bool = True, ips: tuple[str, ...] = ()) -> PodMaps:
    """The map contents implementing a spec (inbound only when inbound_in_ebpf) for a pod with these IPs,
    before `with_netns` names the pod netns."""
    part = _spec_part(spec, inbound_in_ebpf)
    local = local_addresses(ips)
    self4, self6 = self_addresses(ips)
    gen = generation_of(
        spec, "inbound-ebpf" if inbound_in_ebpf else "inbound-fallback", *local, "nat-fam-v4", str(self4), str(self6)
    )
    config = struct.pack(
        CONFIG_FMT, *part.head, gen, cgroup_id, part.inbound_port, families_mask(ips), part.probe4, part.probe6,
        part.proxy_gid, 0, int.from_bytes(self4.packed, "little") if self4 else 0,  # network order as the C reads it
        self6.packed if self6 else b"\0" * 16, 0, part.hbone, 0, 0,
    )  # fmt: skip
    return dataclasses.replace(part.sets, config=config, generation=gen,
                               local_addrs=tuple(lpm_key(ipaddress.ip_network(a)) for a in local))


def with_netns(
    pm: PodMaps, netns_cookie: int, netns_ino: int, tc_slot: int = 0, cgroup_id: int | None = None
) -> PodMaps:
    """The same map contents for the pod netns with that SO_NETNS_COOKIE (the node's pod parameters and the
    TC programs' flow state are keyed by it), inode number (the check that the pod kept its netns) and TC
    slot (pod_index.tc_slot), and (when given) in the cgroup of that id; none is part of the spec hash."""
    values = list(struct.unpack(CONFIG_FMT, pm.config))
    if cgroup_id is not None:
        values[_CGROUP] = cgroup_id
    values[_COOKIE_LO], values[_COOKIE_HI] = netns_cookie & 0xFFFF_FFFF, (netns_cookie >> 32) & 0xFFFF_FFFF
    values[_NETNS_INO] = netns_ino & 0xFFFF_FFFF
    values[_TC_SLOT] = tc_slot
    return dataclasses.replace(pm, config=struct.pack(CONFIG_FMT, *values))


# struct hr_config's fields in CONFIG_FMT's order
CONFIG_FIELDS = (
    "mode",
    "proxy_uid",
    "mark",
    "mark_mask",
    "outbound_port",
    "dns_port",
    "capture_dns",
    "include_all4",
    "include_all6",
    "inbound_mode",
    "generation",
    "cgroup_id",
    "inbound_port",
    "families",
    "probe_src4",
    "probe_src6",
    "proxy_gid",
    "netns_cookie_lo",
    "self_ip4",
    "self_ip6",
    "netns_cookie_hi",
    "hbone_port",
    "tc_slot",
    "netns_ino",
)
_COOKIE_LO, _COOKIE_HI, _NETNS_INO, _TC_SLOT, _CGROUP = (
    CONFIG_FIELDS.index(f) for f in ("netns_cookie_lo", "netns_cookie_hi", "netns_ino", "tc_slot", "cgroup_id")
)


def unpack_config(raw: bytes) -> dict[str, int]:
    raw = raw[:CONFIG_SIZE].ljust(CONFIG_SIZE, b"\0")  # a config map pinned by an older, shorter layout
    values = struct.unpack(CONFIG_FMT, raw)
    out = dict(zip(CONFIG_FIELDS, values, strict=True))
    del out["probe_src6"]
    del out["self_ip6"]
    out["netns_cookie"] = out["netns_cookie_hi"] << 32 | out["netns_cookie_lo"]
    return out


def needs_inbound(spec: Spec) -> bool:
    """Whether the spec asks for inbound capture."""
    if isinstance(spec, SidecarSpec):
        return spec.include_inbound_ports is None or len(spec.include_inbound_ports) > 0
    return True


def unsupported_reason(spec: Spec) -> str | None:
    """Pure: why eBPF cannot implement this spec on any node (the agent then uses iptables for the pod), or
    None."""
    if isinstance(spec, SidecarSpec) and spec.interception_mode == "TPROXY" and needs_inbound(spec):
        return (
            "sidecar interceptionMode TPROXY is not implemented in eBPF: the proxy's original-source "
            "connections to the app (mark 1337, a foreign source over lo) need the fwmark policy routing "
            "and CONNMARK of the iptables TPROXY rules; use backend 'iptables' for such pods"
        )
    if isinstance(spec, SidecarSpec) and (spec.exclude_interfaces or spec.kubevirt_interfaces):
        return interfaces_reason(spec)
    return None


def interfaces_reason(spec: SidecarSpec) -> str:
    """Why the interface annotations keep a sidecar pod off eBPF: a cgroup connect hook runs before
    routing, so it cannot tell the interface a connection will leave by (excludeInterfaces), and a VM's
    traffic forwarded through the pod (kubevirtInterfaces) passes no socket hook of the pod at all."""
    pairs = (("excludeInterfaces", spec.exclude_interfaces), ("kubevirtInterfaces", spec.kubevirt_interfaces))
    which = " and ".join(name for name, value in pairs if value)
    return (
        f"sidecar {which} not implemented in eBPF: the connect hooks run before routing (no output "
        "interface) and forwarded VM traffic passes no socket hook of the pod; use backend 'iptables' for such pods"
    )


EVERYWHERE = (
    ipaddress.IPv4Network("0.0.0.0/1"),
    ipaddress.IPv4Network("128.0.0.0/1"),
    ipaddress.IPv6Network("::/1"),
    ipaddress.IPv6Network("8000::/1"),
)  # every address, without /0 (iptables-save drops "-d 0.0.0.0/0", which trips rule comparisons)


def inbound_only(spec: Spec) -> Spec:
    """The same spec with all outbound capture (and DNS) switched off: what the inbound fallback installs.

    Sidecar: no include ranges (the spec's "no outbound capture"); ambient: every address excluded.
    """
    if isinstance(spec, SidecarSpec):
        return dataclasses.replace(spec, include_outbound_ranges=(), include_outbound_ports=())
    return dataclasses.replace(spec, exclude_outbound_ranges=EVERYWHERE, capture_dns=False)
