"""The plugin's ADD, DEL, GC and STATUS run inside the agent, for a relayed request (`cni.contract.relay`):
the same validation of the environment, the network configuration and prevResult, the same netns check,
the same decision and reply handling as the plugin's own ADD through the agent (`cni.plugin.via_agent`,
with the agent's in-process transport), the same result or CNI error object. The agent prints nothing: it
sends back what the plugin prints.

A relayed DEL is decided by the agent (`Delete`: from what it holds and its pod cache, as the plugin's
own DEL would from its pod source) and logged as the plugin logs it. A GC is the plugin's own (nothing
lives outside the pod netns to collect).

A relayed STATUS is answered here too: the configuration and its version checked as the plugin checks
them (the same CNI errors), then ready. What the plugin's own STATUS looks for — its pod source, the
rules tools, the agent socket — is what its standalone ADD needs; the ADDs of a node whose agent answers
on the configured socket are the agent's, which is up. Not logged when ready (a runtime asks every few
seconds).

`Declined` is raised where the plugin would not have used this agent, or would have gone on with its
own standalone path: the configuration names another agent socket, the ADD carries no pod identity or its
namespace is excluded, the agent left the pod to the plugin, or a DEL leaves rules for the plugin to remove.
"""

from __future__ import annotations

import os
import time

from cni.contract import jsoncodec, relay
from cni.contract.errors import CniError
from cni.plugin import cni_env, netconf
from cni.plugin import result as cni_result
from cni.plugin.decide import without_pod
from cni.plugin.entry import cmd_gc, failed, internal_error, netns_inode, prev_result, require_1_1
from cni.plugin.via_agent import add_via_agent

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from cni.plugin.cni_env import CniEnv
    from cni.plugin.log import JsonLog
    from cni.plugin.netconf import NetConf
    from cni.plugin.via_agent import Send

    #: the agent's part of a relayed DEL (raises Declined when the plugin's own DEL must run)
    Delete = Callable[[CniEnv, NetConf, JsonLog], None]


def elapsed_ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 2)


class Declined(Exception):
    """The plugin's own path must run this command (the message says why)."""


def run_relayed(environ: Mapping[str, str], stdin: bytes, own_socket: str, send: Send,
                log: JsonLog, delete: Delete | None = None) -> tuple[int, str]:
    """(exit status, stdout text) of the command, as the plugin would have ended it; Declined otherwise
    (`delete`: the agent's part of a DEL; without it a DEL is declined)."""
    started = time.monotonic()
    log.bind(container_id=environ.get("CNI_CONTAINERID", "")[:128], netns=environ.get("CNI_NETNS", "")[:256])
    version = netconf.requested_version(stdin) or netconf.LATEST_VERSION
    try:
        env = cni_env.parse_env(environ)
        if env.command not in relay.COMMANDS:
            raise Declined(f"{env.command} is not relayed")
        log.bind(pod=env.k8s.name, namespace=env.k8s.namespace)
        conf = netconf.parse_config(stdin, env.command)
        version = conf.cni_version
        log.configure(conf.log_file, conf.log_level)
        if os.path.normpath(conf.agent_socket) != os.path.normpath(own_socket):
            raise Declined(f"the configuration names agent socket {conf.agent_socket}")
        if env.command == "STATUS":
            require_1_1(conf, "STATUS")
            return 0, ""
        if env.command == "GC":
            cmd_gc(conf, log)
        elif env.command == "DEL":
            if delete is None:
                raise Declined("this agent takes no relayed DEL")
            if reason := without_pod(env, conf):
                log.info("membership", f"mode none: {reason}", mode="none")
            else:
                delete(env, conf, log)
        if env.command != "ADD":
            log.info("done", f"{env.command} ok (relayed to the agent)", duration_ms=elapsed_ms(started))
            return 0, ""
        if reason := without_pod(env, conf):
            raise Declined(reason)
        prev, prev_version = prev_result(conf)
        out = cni_result.convert(prev, prev_version, conf.cni_version)
        netns_inode(env.netns)
        if not add_via_agent(env, conf, prev, log, send=send):
            raise Declined("the agent left the ADD to the plugin")
        log.info("done", "ADD ok (relayed to the agent)", duration_ms=elapsed_ms(started))
        return 0, jsoncodec.dumps(out) + "\n"
    except CniError as exc:
        return failed(exc, version, log)
    except Declined:
        raise
    except Exception as exc:  # a bug: still answer in the CNI format
        return failed(internal_error(exc), version, log)
