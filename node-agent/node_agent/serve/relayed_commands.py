"""The relayed commands (`cni.contract.relay`, protocol version 3) in the agent: the plugin's launcher sent
the runtime's CNI_* environment and the network configuration of an ADD, DEL, GC or STATUS; the plugin's
own code runs here (`cni.plugin.relayed`) with an in-process transport to the one-request ADD
(`warm_add`, the request validated and its netns checked exactly as when it comes over the socket) and the
agent's part of a DEL (`relayed_del`). The plugin's log lines go where the plugin would put them
(`cni.plugin.log`: the agent's `cni-log.sock` next to the configured log file, else the file). The answer
is what the plugin prints, or "standalone" when the plugin's own path must run.

A request that is not a valid relay request is refused with `RequestError` (the server answers it in
the version 1 failure format, which the launcher takes as "agent not usable": the plugin's own path runs
and reports what is wrong).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cni.contract import agent_add, events, jsoncodec, relay
from cni.plugin.agent_add_client import Unreachable
from cni.plugin.entry import early_log_file
from cni.plugin.log import JsonLog
from cni.plugin.relayed import Declined, run_relayed
from node_agent.serve.add_request import Later, WarmAddFn, at_once, parse_add_request, speaks
from node_agent.serve.cni_request import RequestError

if TYPE_CHECKING:
    from cni.plugin.cni_env import CniEnv
    from cni.plugin.netconf import NetConf

    #: the agent's part of a DEL (`relayed_del.RelayedDel`), with what sends the `wait` frame before its removal
    AgentDelete = Callable[[CniEnv, NetConf, JsonLog, Callable[[], None]], None]

log = logging.getLogger("headrace.agent.cni")

MAX_ENV_VALUE = 16384


def is_relay(obj: Any) -> bool:
    return speaks(obj, relay.VERSION)


def parse_relay(obj: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    """(the CNI_* environment, the configuration as bytes) of a relay request; RequestError if malformed."""
    cmd = obj.get(events.CMD)
    if cmd not in relay.COMMANDS:
        raise RequestError(f"protocol version {relay.VERSION} has only {', '.join(relay.COMMANDS)}, "
                           f"not {str(cmd)[:40]!r}")
    env = obj.get(relay.ENV)
    if not isinstance(env, dict) or not all(
            k in relay.ENV_KEYS and isinstance(v, str) and len(v) <= MAX_ENV_VALUE for k, v in env.items()):
        raise RequestError(f"'env' must map {', '.join(relay.ENV_KEYS)} to strings")
    if env.get("CNI_COMMAND") != cmd:
        raise RequestError(f"'cmd' {cmd} and CNI_COMMAND {str(env.get('CNI_COMMAND'))[:40]!r} differ")
    config = obj.get(relay.STDIN)
    if not isinstance(config, dict):
        raise RequestError("'stdin' must be the network configuration object")
    return env, jsoncodec.dumps(config).encode()


def relayed_command(obj: dict[str, Any], own_socket: str, warm_add: WarmAddFn, check_netns: Callable[[str], None],
                    send_frame: Callable[[bytes], None], later: Later = at_once, delete: AgentDelete | None = None
                    ) -> bytes:
    """Run one relayed command; the final frame (`send_frame` sends a `wait` frame when the agent holds the
    pod an ADD names, and before the agent's removal of a DEL's pod; `later` takes what runs once the final
    frame is sent; `delete`: the agent's part of a DEL, none: a DEL is left to the plugin)."""
    env, stdin = parse_relay(obj)

    def send(_socket_path: str, request: dict[str, Any], timeout: float) -> agent_add.AddReply:
        try:
            warm = parse_add_request(request)
            check_netns(warm.netns)
        except RequestError as exc:
            raise Unreachable(str(exc)) from exc
        reply = warm_add(warm, lambda _interim: send_frame(relay.wait_frame(timeout)), later)
        return agent_add.parse_reply(reply)

    def delete_here(env: CniEnv, conf: NetConf, plog: JsonLog) -> None:
        assert delete is not None
        delete(env, conf, plog, lambda: send_frame(relay.wait_frame(conf.agent_timeout)))

    plugin_log = JsonLog(early_log_file(stdin, {}), cmd=env["CNI_COMMAND"])
    try:
        status, text = run_relayed(env, stdin, own_socket, send, plugin_log,
                                   delete_here if delete is not None else None)
    except Declined as exc:
        log.info("relayed %s left to the plugin: %s", env["CNI_COMMAND"], exc, extra={
            "step": "cni-relay", "pod": plugin_log.context.get("pod", ""),
            "namespace": plugin_log.context.get("namespace", ""), "netns": env.get("CNI_NETNS", "")})
        return relay.standalone_frame()
    finally:
        plugin_log.close()
    return relay.done_frame(status, text.encode())
