"""The static bootstrap of an Istio-like Envoy sidecar, for the kernel tests (pure data: no process, no I/O).

What it has, as Istio's sidecar has it:
- `virtualOutbound` on 15001 (0.0.0.0 and ::): `use_original_dst` and the original_dst listener filter, a
  blackhole chain for destination port 15001, the catch-all TCP chain to `PassthroughCluster`
  (ORIGINAL_DST); redirected connections whose original port has an HTTP listener are handed off to it;
- per HTTP port an outbound listener `0.0.0.0_<port>` (bind_to_port false): HTTP connection manager with
  the `allow_any` virtual host routing to `PassthroughCluster`;
- `virtualInbound` on 15006: original_dst listener filter, a blackhole chain for port 15006, per HTTP port
  an HTTP chain to `inbound|<port>||`, the catch-all TCP chain to `InboundPassthroughCluster`; both
  clusters ORIGINAL_DST with the upstream bound to 127.0.0.6 (IPv6: ::6). TPROXY mode
  (`sidecar.istio.io/interceptionMode: TPROXY`): `transparent: true` on the capture listeners and the
  original_src listener filter (mark 1337) on virtualInbound, so the app sees the client's address;
- admin on 127.0.0.1:15000; 15021 (`/healthz/ready`, answered from the admin's /ready), 15090
  (`/stats/prometheus`, from the admin), 15008 (`inbound_hbone`: a plain HTTP listener standing in for the
  HBONE terminator, which needs mesh certificates).

Every listener writes a JSON access-log line per connection (TCP) or request (HTTP) with a constant
`listener` field; listener stats use the listener name as stat prefix (`listener.<name>.downstream_cx_total`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROXY_UID = 1337
ADMIN_PORT = 15000
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
HBONE_PORT = 15008
HEALTH_PORT = 15021
STATS_PORT = 15090
PASSTHROUGH_SOURCE = {4: "127.0.0.6", 6: "::6"}

_ANY = "type.googleapis.com/envoy.extensions"


@dataclass(frozen=True)
class SidecarConfig:
    access_log: str
    tproxy: bool = False
    http_ports: tuple[int, ...] = (8080,)


def _addr(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _wildcards(port: int) -> dict[str, Any]:
    """Istio's dual-stack listener address: 0.0.0.0 plus :: as an additional address."""
    return {"address": _addr("0.0.0.0", port), "additional_addresses": [{"address": _addr("::", port)}]}


def _access_log(cfg: SidecarConfig, listener: str, http: bool) -> list[dict[str, Any]]:
    fmt: dict[str, Any] = {
        "listener": listener,
        "downstream_remote": "%DOWNSTREAM_REMOTE_ADDRESS%",
        "downstream_local": "%DOWNSTREAM_LOCAL_ADDRESS%",
        "upstream_cluster": "%UPSTREAM_CLUSTER%",
        "upstream_host": "%UPSTREAM_HOST%",
        "upstream_local": "%UPSTREAM_LOCAL_ADDRESS%",
        "flags": "%RESPONSE_FLAGS%",
    }
    if http:
        fmt.update({"method": "%REQ(:METHOD)%", "path": "%REQ(:PATH)%", "status": "%RESPONSE_CODE%"})
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": f"{_ANY}.access_loggers.file.v3.FileAccessLog",
                "path": cfg.access_log,
                "log_format": {"json_format": fmt},
            },
        }
    ]


def _tcp_proxy(cfg: SidecarConfig, listener: str, cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": f"{_ANY}.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": cluster,
            "cluster": cluster,
            "access_log": _access_log(cfg, listener, http=False),
        },
    }


def _hcm(
    cfg: SidecarConfig, listener: str, stat_prefix: str, routes: list[dict[str, Any]], vhost: str | None = None
) -> dict[str, Any]:
    """An HTTP connection manager with one virtual host (`vhost`, default the listener's name) for all domains."""
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": f"{_ANY}.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "route_config": {
                "name": listener,
                "virtual_hosts": [{"name": vhost or listener, "domains": ["*"], "routes": routes}],
            },
            "http_filters": [
                {"name": "envoy.filters.http.router",
                 "typed_config": {"@type": f"{_ANY}.filters.http.router.v3.Router"}}
            ],
            "access_log": _access_log(cfg, listener, http=True),
        },
    }


def _route(cluster: str, prefix: str = "/", rewrite: str | None = None) -> dict[str, Any]:
    action: dict[str, Any] = {"cluster": cluster, "timeout": "0s"}
    if rewrite is not None:
        action["prefix_rewrite"] = rewrite
    return {"match": {"prefix": prefix}, "route": action}


def _listener_filter(name: str, typed: str, **fields: Any) -> dict[str, Any]:
    return {"name": f"envoy.filters.listener.{name}", "typed_config": {"@type": f"{_ANY}.{typed}", **fields}}


ORIGINAL_DST = _listener_filter("original_dst", "filters.listener.original_dst.v3.OriginalDst")


def _blackhole(cfg: SidecarConfig, listener: str, port: int) -> dict[str, Any]:
    return {
        "name": f"{listener}-blackhole",
        "filter_chain_match": {"destination_port": port},
        "filters": [_tcp_proxy(cfg, listener, "BlackHoleCluster")],
    }


def _virtual_outbound(cfg: SidecarConfig) -> dict[str, Any]:
    name = "virtualOutbound"
    return {
        "name": name,
        "stat_prefix": name,
        **_wildcards(OUTBOUND_PORT),
        "use_original_dst": True,
        "transparent": cfg.tproxy,
        "traffic_direction": "OUTBOUND",
        "listener_filters": [ORIGINAL_DST],
        "filter_chains": [
            _blackhole(cfg, name, OUTBOUND_PORT),
            {"name": f"{name}-catchall-tcp", "filters": [_tcp_proxy(cfg, name, "PassthroughCluster")]},
        ],
    }


def _outbound_http(cfg: SidecarConfig, port: int) -> dict[str, Any]:
    name = f"0.0.0.0_{port}"
    hcm = _hcm(cfg, name, f"outbound_0.0.0.0_{port}", [_route("PassthroughCluster")], vhost="allow_any")
    return {
        "name": name,
        "stat_prefix": name,
        **_wildcards(port),
        "bind_to_port": False,
        "traffic_direction": "OUTBOUND",
        "filter_chains": [{"filters": [hcm]}],
    }


def _virtual_inbound(cfg: SidecarConfig) -> dict[str, Any]:
    name = "virtualInbound"
    filters = [ORIGINAL_DST]
    if cfg.tproxy:
        filters.append(_listener_filter("original_src", "filters.listener.original_src.v3.OriginalSrc", mark=PROXY_UID))
    chains: list[dict[str, Any]] = [_blackhole(cfg, name, INBOUND_PORT)]
    for port in cfg.http_ports:
        cluster = f"inbound|{port}||"
        chains.append({
            "name": f"0.0.0.0_{port}",
            "filter_chain_match": {"destination_port": port},
            "filters": [_hcm(cfg, name, f"inbound_0.0.0.0_{port}", [_route(cluster)])],
        })  # fmt: skip
    chains.append({"name": f"{name}-catchall-tcp", "filters": [_tcp_proxy(cfg, name, "InboundPassthroughCluster")]})
    return {
        "name": name,
        "stat_prefix": name,
        **_wildcards(INBOUND_PORT),
        "transparent": cfg.tproxy,
        "traffic_direction": "INBOUND",
        "listener_filters": filters,
        "filter_chains": chains,
    }


def _plain_http(cfg: SidecarConfig, name: str, port: int, routes: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name,
        "stat_prefix": name,
        **_wildcards(port),
        "filter_chains": [{"filters": [_hcm(cfg, name, name, routes)]}],
    }


def _direct(status: int, body: str) -> dict[str, Any]:
    return {"match": {"prefix": "/"}, "direct_response": {"status": status, "body": {"inline_string": body}}}


def _original_dst_cluster(name: str, bind_passthrough: bool) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "5s",
    }
    if bind_passthrough:
        cluster["upstream_bind_config"] = {
            "source_address": _addr(PASSTHROUGH_SOURCE[4], 0)["socket_address"],
            "extra_source_addresses": [{"address": _addr(PASSTHROUGH_SOURCE[6], 0)["socket_address"]}],
        }
    return cluster


def _static_cluster(name: str, host: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(host, port)}}]}],
        },
    }


def bootstrap(cfg: SidecarConfig) -> dict[str, Any]:
    """The static bootstrap of an Istio-like sidecar (see the module docstring)."""
    listeners = [
        _virtual_outbound(cfg),
        *(_outbound_http(cfg, p) for p in cfg.http_ports),
        _virtual_inbound(cfg),
        _plain_http(cfg, "health", HEALTH_PORT, [_route("admin", "/healthz/ready", "/ready"), _direct(404, "")]),
        _plain_http(cfg, "prometheus", STATS_PORT, [_route("admin", "/stats/prometheus"), _direct(404, "")]),
        _plain_http(cfg, "inbound_hbone", HBONE_PORT, [_direct(200, "hbone")]),
    ]
    clusters = [
        _original_dst_cluster("PassthroughCluster", bind_passthrough=False),
        _original_dst_cluster("InboundPassthroughCluster", bind_passthrough=True),
        *(_original_dst_cluster(f"inbound|{p}||", bind_passthrough=True) for p in cfg.http_ports),
        {"name": "BlackHoleCluster", "type": "STATIC", "connect_timeout": "1s"},
        _static_cluster("admin", "127.0.0.1", ADMIN_PORT),
    ]
    return {
        "node": {"id": "sidecar~headrace-test", "cluster": "headrace-test"},
        "admin": {"address": _addr("127.0.0.1", ADMIN_PORT)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def host_of(address: str) -> str:
    """The host part of an access-log address (`10.0.0.1:80`, `[fd00::1]:80`)."""
    return address.rsplit(":", 1)[0].strip("[]")


def hostport(host: str, port: int) -> str:
    """An address the way Envoy's access log writes it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
