"""The plugin's ADD run inside the agent, for a relayed request (`cni.contract.relay`): the same validation
of the environment, the network configuration and prevResult, the same netns check, the same decision
and reply handling as the plugin's own ADD through the agent (`cni.plugin.via_agent`, with the agent's
in-process transport), the same result or CNI error object. The agent prints nothing: it sends back what
the plugin prints.

A relayed STATUS is answered here too: the configuration and its version checked as the plugin checks
them (the same CNI errors), then ready. What the plugin's own STATUS looks for — its pod source, the
rules tools, the agent socket — is what its standalone ADD needs; the ADDs of a node whose agent answers
on the configured socket are the agent's, which is up. Not logged when ready (a runtime asks every few
seconds).

`Declined` is raised where the plugin would not have used this agent, or would have gone on with its
own standalone path: the configuration names another agent socket, the invocation carries no pod
identity, the namespace is excluded, or the agent left the pod to the plugin.
"""

from __future__ import annotations

import os
import time

from cni.contract import jsoncodec, relay
from cni.contract.errors import CniError
from cni.plugin import cni_env, netconf
from cni.plugin import result as cni_result
from cni.plugin.entry import failed, internal_error, netns_inode, prev_result, require_1_1
from cni.plugin.via_agent import add_via_agent

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Mapping

    from cni.plugin.log import JsonLog
    from cni.plugin.via_agent import Send


class Declined(Exception):
    """The plugin's own path must run this ADD (the message says why)."""


def run_relayed(environ: Mapping[str, str], stdin: bytes, own_socket: str, send: Send,
                log: JsonLog) -> tuple[int, str]:
    """(exit status, stdout text) of the ADD or STATUS, as the plugin would have ended it; Declined
    otherwise."""
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
        if not env.k8s.known or env.k8s.namespace in conf.exclude_namespaces:
            raise Declined("no pod identity in CNI_ARGS, or the namespace is excluded")
        prev, prev_version = prev_result(conf)
        out = cni_result.convert(prev, prev_version, conf.cni_version)
        netns_inode(env.netns)
        if not add_via_agent(env, conf, prev, log, send=send):
            raise Declined("the agent left the ADD to the plugin")
        log.info("done", "ADD ok (relayed to the agent)",
                 duration_ms=round((time.monotonic() - started) * 1000, 2))
        return 0, jsoncodec.dumps(out) + "\n"
    except CniError as exc:
        return failed(exc, version, log)
    except Declined:
        raise
    except Exception as exc:  # a bug: still answer in the CNI format
        return failed(internal_error(exc), version, log)
