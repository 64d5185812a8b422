"""ADD through a running agent: one request (`cni.contract.agent_add`), the agent decides the pod's mode
from its pod cache and applies a sidecar pod's rules in-process; the plugin only reports.

`add_via_agent` answers True when the agent did the ADD, False when the plugin's standalone path must run
(no agent socket, agent not answering within the short first-answer bound, an agent that speaks only
protocol version 1, or one that declined this pod), and raises CniError when the ADD failed for good
(an ambient pod the agent could not enrol, a bad annotation, an agent that stopped answering after it
took the pod). When the launcher relayed the ADD to the same agent first (`cni.plugin.launch`) and it did
not end there, that outcome stands: the agent is not asked again, and a pod it held without answering
fails closed. Stdlib only; the socket client is imported only when the agent socket exists.
"""

from __future__ import annotations

import os

from cni.contract import agent_add as wire
from cni.contract import errors
from cni.contract.errors import CniError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from cni.contract.agent_add import AddReply
    from cni.plugin.cni_env import CniEnv
    from cni.plugin.log import JsonLog
    from cni.plugin.netconf import NetConf

    #: how the launcher's relay of this command went, when it did not end it: (agent socket, kind, message)
    Relayed = tuple[str, str, str]
    #: the ADD request's transport: (agent socket, request, timeout) -> the agent's final reply
    Send = Callable[[str, dict[str, Any], float], AddReply]


def rules_setting(conf: NetConf) -> str:
    """The backend the plugin itself writes sidecar rules with (the agent must use the same one, so the
    plugin's own DEL can remove them when the agent is gone)."""
    if conf.backend in ("ebpf", "iptables", "nftables"):
        return conf.backend
    from cni.plugin import rules_backend  # `auto`: looks for the iptables tools

    return "nftables" if rules_backend.uses_nftables(conf) else "iptables"


def request_of(env: CniEnv, conf: NetConf, prev: dict[str, Any]) -> dict[str, Any]:
    ips = prev.get("ips")
    addresses = [ip["address"] for ip in (ips if isinstance(ips, list) else [])
                 if isinstance(ip, dict) and isinstance(ip.get("address"), str)]
    k8s = env.k8s
    return wire.add_request(env.container_id, env.netns, env.ifname, k8s.namespace, k8s.name, k8s.uid,
                            addresses, rules_setting(conf), conf.iptables, conf.exclude_namespaces)


def _unfinished(why: str) -> CniError:
    """The agent took the pod and gave no final answer: the ADD fails (never the standalone path)."""
    return CniError(errors.AGENT_UNREACHABLE, "headrace agent did not finish the ADD", why)


def relayed_here(conf: NetConf, relayed: Relayed | None) -> tuple[str, str] | None:
    """(kind, message) of the launcher's relay of this command when it went to the configured agent."""
    if relayed is None or os.path.normpath(relayed[0]) != os.path.normpath(conf.agent_socket):
        return None
    return relayed[1], relayed[2]


def _after_relay(conf: NetConf, relayed: Relayed | None, log: JsonLog) -> bool:
    """Whether the launcher's relay settled this agent's part (True: standalone path; raises when the
    agent held the pod and did not answer)."""
    here = relayed_here(conf, relayed)
    if here is None:
        return False
    kind, msg = here
    if kind == "held":
        raise _unfinished(msg)
    if kind == "standalone":
        log.info("agent", "agent left the ADD to the plugin", agent_socket=conf.agent_socket)
    else:
        log.warning("agent", f"agent not usable, standalone path: {msg}", agent_socket=conf.agent_socket)
    return True


def add_via_agent(env: CniEnv, conf: NetConf, prev: dict[str, Any], log: JsonLog,
                  relayed: Relayed | None = None, send: Send | None = None) -> bool:
    """`relayed`: (agent socket, kind, message) of the launcher's relay of this ADD (`cni.plugin.launch`),
    when it did not end it; `send`: the transport (the agent runs this in-process with its own)."""
    if _after_relay(conf, relayed, log):
        return False
    from cni.plugin.agent_add_client import Unreachable

    if send is None:
        if not os.path.exists(conf.agent_socket):
            return False
        from cni.plugin.agent_add_client import send_add

        send = send_add
    try:
        reply = send(conf.agent_socket, request_of(env, conf, prev), conf.agent_timeout)
    except Unreachable as exc:
        if exc.held:
            raise _unfinished(exc.msg) from exc
        log.warning("agent", f"agent not usable, standalone path: {exc.msg}", agent_socket=conf.agent_socket)
        return False
    if reply.kind == "standalone":
        log.info("agent", f"agent left the ADD to the plugin: {reply.error}")
        return False
    if reply.kind == "done":
        log.info("membership", f"mode {reply.mode}: {reply.reason or 'decided by the agent'}", mode=reply.mode)
        if reply.mode == "sidecar":
            log.info("redirect", "sidecar redirect applied by the agent", backend=reply.backend, state=reply.state)
        elif reply.mode == "ambient":
            log.info("agent", f"agent answered {reply.state or 'ok'}", state=reply.state)
        return True
    if reply.code:
        raise CniError(reply.code, f"headrace agent refused the {reply.mode or 'pod'}'s ADD", reply.error)
    if reply.mode == "sidecar" and conf.backend != "ebpf":
        log.warning("agent", f"agent could not apply the sidecar redirect, standalone path: {reply.error}")
        return False
    code = errors.TRY_AGAIN_LATER if reply.retry else errors.AGENT_REFUSED
    raise CniError(code, "headrace agent could not ADD the pod", reply.error)
