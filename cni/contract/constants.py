"""The redirect contract's constants: proxy identity, ports, marks, policy routing, interception modes.

One home for the values that both the agent's ``SidecarSpec``/``AmbientSpec`` (cni/contract/spec.py) and the
plugin's light ``SidecarParams`` (cni/contract/sidecar_params.py) default to. Plain ints, strings and
tuples, no imports at run time: the CNI plugin loads this on its sidecar path.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from typing import Final

    from cni.contract.kinds import InterceptionMode

# ---- sidecar (per-pod proxy, Istio-compatible)
PROXY_UID = 1337
PROXY_GID = 1337
SIDECAR_OUTBOUND_PORT = 15001
SIDECAR_INBOUND_PORT = 15006
SIDECAR_EXCLUDED_INBOUND = (15020, 15021, 15090)
# The proxy's HBONE (mTLS tunnel) listener, istio-iptables' "inbound tunnel port": never captured inbound,
# and the proxy's own connections to its pod's IP on this port go straight to it (not to the inbound port).
SIDECAR_HBONE_PORT = 15008

# Inbound interception modes (annotation sidecar.istio.io/interceptionMode). TPROXY delivers inbound
# connections unrewritten to the proxy's IP_TRANSPARENT listener; it needs the marks and the
# policy-routing table below (as istio-iptables' TPROXY mode).
INTERCEPTION_REDIRECT: Final = "REDIRECT"
INTERCEPTION_TPROXY: Final = "TPROXY"
INTERCEPTION_MODES: tuple[InterceptionMode, ...] = (INTERCEPTION_REDIRECT, INTERCEPTION_TPROXY)
# "NONE": Istio's "no traffic interception at all" for a sidecar pod. Such a pod gets no redirection (the
# membership decision makes it a pass-through pod); it is never a spec's mode.
INTERCEPTION_NONE = "NONE"
TPROXY_MARK = 1337  # packet mark of diverted inbound packets (and of the proxy's original_src sockets)
TPROXY_ROUTE_TABLE = 133  # policy routing table: "fwmark TPROXY_MARK lookup 133", local default via lo
TPROXY_OUTBOUND_MARK = 1338  # the proxy's own connections to its pod's IP over lo (captured inbound)

# ---- ambient (node proxy, in-pod redirect)
AMBIENT_OUTBOUND_PORT = 15001
AMBIENT_INBOUND_PORT = 15006
AMBIENT_HBONE_PORT = 15008
AMBIENT_DNS_PORT = 15053
AMBIENT_MARK = 0x539  # SO_MARK of the node proxy's own sockets: never redirected
AMBIENT_MARK_MASK = 0xFFF
# Source address of host-originated probes (kubelet) to enrolled pods, as text (spec.py parses them).
PROBE_SNAT_V4_TEXT = "169.254.7.127"
PROBE_SNAT_V6_TEXT = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
