"""headrace-cni: the chained CNI plugin (ADD, DEL, CHECK, VERSION, STATUS, GC).

Stdlib only on every path that runs per pod (the iptables module it calls is stdlib only too). stdout
carries only the CNI result or the CNI error object; logs go to ``log_file`` as JSON lines.
Every input is validated before anything touches the pod's network namespace.
"""

from __future__ import annotations

import os
import sys
import time

from cni.contract import errors, jsoncodec
from cni.contract.errors import CniError
from cni.kernel.netns import NetnsFileError, pod_netns_inode
from cni.plugin import cni_env, netconf
from cni.plugin import result as cni_result
from cni.plugin.log import DEFAULT_LOG_FILE, JsonLog

# Start-up cost is most of the plugin's wall time: nothing here imports `typing`, `re`, `json`,
# `collections`, `ipaddress` or `subprocess` on the non-mesh path (tests/unit/test_cni_plugin_process.py).
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from cni.contract import membership
    from cni.plugin.agent_client import PluginEvent
    from cni.plugin.cni_env import CniEnv
    from cni.plugin.decide import Decision
    from cni.plugin.netconf import NetConf
    from cni.plugin.relay_client import Answer
    from cni.plugin.via_agent import Relayed

LOG_FILE_ENV = "HEADRACE_CNI_LOG_FILE"  # overrides the default log file before the config is read


# ---------------------------------------------------------------------------------------------------
# netns


class NetnsUnusable(CniError):
    """CNI_NETNS cannot be acted on; ``gone`` when it no longer is a namespace at all."""

    def __init__(self, msg: str, details: str = "", gone: bool = False) -> None:
        super().__init__(errors.NETNS_UNAVAILABLE, msg, details)
        self.gone = gone


def netns_inode(path: str) -> int:
    """Validate that ``path`` is a network namespace other than our own; return its inode."""
    try:
        return pod_netns_inode(path)
    except NetnsFileError as exc:
        raise NetnsUnusable(exc.msg, exc.details, gone=exc.gone) from exc


def netns_for_del(path: str, log: JsonLog) -> bool:
    """DEL: whether there is a pod netns to clean; a missing or unmounted one is not an error."""
    if not path:
        log.info("netns", "no CNI_NETNS given (netns already released): nothing to remove in it")
        return False
    try:
        netns_inode(path)
    except NetnsUnusable as exc:
        if not exc.gone:
            raise
        log.info("netns", f"network namespace already gone: {exc.msg}")
        return False
    return True


def uses_agent(mode: membership.Mode | None, conf: NetConf) -> bool:
    return mode == "ambient" or (mode == "sidecar" and conf.backend == "ebpf") or mode is None


# ---------------------------------------------------------------------------------------------------
# agent


def agent_event(cmd: str, env: CniEnv, conf: NetConf, decision: Decision, ips: list[str],
                removes: tuple[str, str] | None = None) -> PluginEvent:
    from cni.plugin.agent_client import PluginEvent

    pod = decision.pod
    mode = decision.mode if decision.mode in ("ambient", "sidecar") else "ambient"
    return PluginEvent(
        cmd=cmd,
        container_id=env.container_id,
        netns=env.netns,
        ifname=env.ifname,
        namespace=pod.namespace if pod else env.k8s.namespace,
        name=pod.name if pod else env.k8s.name,
        uid=(pod.authoritative_uid if pod and pod.authoritative_uid else env.k8s.uid),
        ips=tuple(ips),
        mode=str(mode),
        removes=removes,
    )


def ask_agent(event: PluginEvent, conf: NetConf, log: JsonLog) -> str:
    """The agent's state for the event (CniError when it is unreachable or refuses)."""
    from cni.plugin.agent_client import AgentUnavailable, send_event

    log.info("agent", f"sending {event.cmd} to the agent", agent_socket=conf.agent_socket, mode=event.mode)
    try:
        reply = send_event(conf.agent_socket, event, conf.agent_timeout)
    except AgentUnavailable as exc:
        raise CniError(errors.AGENT_UNREACHABLE, "headrace agent unreachable", str(exc)) from exc
    if not reply.ok:
        code = errors.TRY_AGAIN_LATER if reply.retry else errors.AGENT_REFUSED
        raise CniError(code, f"headrace agent could not {event.cmd} the pod", reply.error)
    log.info("agent", f"agent answered {reply.state or 'ok'}", state=reply.state)
    return reply.state


# ---------------------------------------------------------------------------------------------------
# commands


def prev_result(conf: NetConf) -> tuple[dict[str, Any], str]:
    assert conf.prev_result is not None  # parse_config enforces it for ADD and CHECK
    return conf.prev_result, cni_result.validate(conf.prev_result, conf.cni_version)


def cmd_add(env: CniEnv, conf: NetConf, log: JsonLog, relayed: Relayed | None = None) -> dict[str, Any]:
    prev, prev_version = prev_result(conf)
    out = cni_result.convert(prev, prev_version, conf.cni_version)
    netns_inode(env.netns)
    if env.k8s.known and env.k8s.namespace not in conf.exclude_namespaces and (
            relayed is not None or os.path.exists(conf.agent_socket)):
        from cni.plugin.via_agent import add_via_agent

        if add_via_agent(env, conf, prev, log, relayed):  # a running agent decided, and applied the rules
            return out
    from cni.plugin import standalone
    from cni.plugin.decide import decide, plugin_redirects

    decision = decide(env, conf, log)
    if plugin_redirects(decision.mode, conf):
        assert decision.pod is not None
        spec = standalone.sidecar_spec(decision.pod.annotations)
        families = cni_result.families(prev)
        standalone.apply_sidecar_redirect(env.netns, spec, families, conf, log)
        log.info(
            "redirect", "sidecar redirect applied", families=list(families), iptables=conf.iptables,
            backend=conf.backend, spec=repr(spec),
        )
    elif decision.mode in ("ambient", "sidecar"):
        if decision.mode == "sidecar" and decision.pod is not None:
            standalone.sidecar_spec(decision.pod.annotations)  # reject bad annotations before the agent
        ask_agent(agent_event("ADD", env, conf, decision, cni_result.addresses(prev)), conf, log)
    return out


def relay_failed(conf: NetConf, relayed: Relayed | None) -> str:
    """Why the launcher's relay of this command to the configured agent found it unusable ("" when it did
    not relay it there, or the agent declined): a DEL then does not wait on that agent a second time."""
    if relayed is None:
        return ""
    from cni.plugin.via_agent import relayed_here

    here = relayed_here(conf, relayed)
    if here is None or here[0] == "standalone":
        return ""
    return here[1] or "the agent did not take the relayed command"


def cmd_del(env: CniEnv, conf: NetConf, log: JsonLog, relayed: Relayed | None = None) -> None:
    from cni.plugin import standalone
    from cni.plugin.decide import decide, plugin_redirects

    decision = decide(env, conf, log, for_del=True)
    if decision.mode == "none":
        return
    unusable = relay_failed(conf, relayed)
    if unusable:
        log.warning("agent", f"DEL not delivered to the agent: {unusable}", agent_socket=conf.agent_socket)
    removed = False
    if plugin_redirects(decision.mode, conf) and os.path.exists(conf.agent_socket) and not unusable:
        from cni.plugin.via_agent import rules_setting

        # a running agent watches such pods: it lets go first, and removes the rules of a pod it holds
        removed = _del_to_agent(env, conf, decision, log, removes=(rules_setting(conf), conf.iptables))
    if removed:
        log.info("redirect", "redirect removed by the agent")
    elif netns_for_del(env.netns, log) and (decision.mode is None or plugin_redirects(decision.mode, conf)):
        if standalone.remove_redirect(env.netns, conf, log):
            log.info("redirect", "redirect removed (if any)")
    if uses_agent(decision.mode, conf) and not unusable:
        if decision.mode is None and not os.path.exists(conf.agent_socket):
            return
        _del_to_agent(env, conf, decision, log)


def _del_to_agent(env: CniEnv, conf: NetConf, decision: Decision, log: JsonLog,
                  removes: tuple[str, str] | None = None) -> bool:
    """Whether the agent removed the rules `removes` names (nothing left for the plugin to remove)."""
    from cni.contract.events import RULES_REMOVED

    prev = conf.prev_result
    ips = cni_result.addresses(prev) if prev is not None else []
    try:
        state = ask_agent(agent_event("DEL", env, conf, decision, ips, removes), conf, log)
    except CniError as exc:
        # DEL must succeed: the agent reconciles against the pod source when it is back.
        log.warning("agent", f"DEL not delivered to the agent: {exc.msg}", details=exc.details)
        return False
    return removes is not None and state == RULES_REMOVED


def cmd_check(env: CniEnv, conf: NetConf, log: JsonLog) -> None:
    prev, _ = prev_result(conf)
    netns_inode(env.netns)
    from cni.plugin import standalone
    from cni.plugin.decide import decide, plugin_redirects

    decision = decide(env, conf, log)
    if plugin_redirects(decision.mode, conf):
        assert decision.pod is not None
        spec = standalone.sidecar_spec(decision.pod.annotations)
        problems = standalone.check_sidecar_redirect(env.netns, spec, cni_result.families(prev), conf)
        if problems:
            raise CniError(errors.CHECK_FAILED, "pod redirect rules are missing or altered", "; ".join(problems))
    elif decision.mode in ("ambient", "sidecar"):
        try:
            ask_agent(agent_event("CHECK", env, conf, decision, cni_result.addresses(prev)), conf, log)
        except CniError as exc:
            if exc.code in (errors.AGENT_REFUSED, errors.TRY_AGAIN_LATER):
                raise CniError(errors.CHECK_FAILED, "pod redirect is missing or altered", exc.details) from exc
            raise


def require_1_1(conf: NetConf, command: str) -> None:
    if conf.cni_version != "1.1.0":
        raise CniError(
            errors.INCOMPATIBLE_VERSION, f"{command} needs cniVersion 1.1.0", f"config has {conf.cni_version}"
        )


def cmd_status(conf: NetConf, log: JsonLog) -> None:
    from cni.plugin import rules_backend
    from cni.plugin.pod_source import PodSourceError

    require_1_1(conf, "STATUS")
    problems: list[str] = []
    if conf.objects_dir and not os.path.isdir(conf.objects_dir):
        problems.append(f"objects_dir {conf.objects_dir} is not a directory")
    if conf.kubeconfig:
        from cni.plugin.kube_api import KubeApiSource

        try:
            KubeApiSource(conf.kubeconfig, conf.api_timeout).credentials()
        except PodSourceError as exc:
            problems.append(str(exc))
    if not conf.kubeconfig and not conf.objects_dir:
        problems.append("no pod source configured (kubeconfig or objects_dir)")
    if conf.backend != "ebpf":
        problems.extend(rules_backend.tool_problems(conf))
    if conf.backend == "ebpf" and not os.path.exists(conf.agent_socket):
        problems.append(f"backend ebpf needs the agent, and {conf.agent_socket} does not exist")
    if problems:
        raise CniError(errors.PLUGIN_NOT_AVAILABLE, "headrace-cni is not ready", "; ".join(problems))
    log.info("status", "ready")


def cmd_gc(conf: NetConf, log: JsonLog) -> None:
    require_1_1(conf, "GC")
    valid = conf.valid_attachments or ()
    # Nothing lives outside the pod netns per attachment: sidecar rules die with the netns, and the
    # agent reconciles ambient pods against its pod source on its own.
    log.info("gc", f"nothing to collect ({len(valid)} valid attachments)", valid_attachments=len(valid))


def version_info(stdin: bytes) -> dict[str, Any]:
    # the spec's VERSION answer carries the version asked for, whether or not the plugin supports it
    requested = netconf.requested_version(stdin, supported_only=False) or netconf.LATEST_VERSION
    return {"cniVersion": requested, "supportedVersions": list(netconf.SUPPORTED_VERSIONS)}


# ---------------------------------------------------------------------------------------------------
# entry


def early_log_file(stdin: bytes, environ: Mapping[str, str]) -> str:
    try:
        obj = jsoncodec.loads_bytes(stdin) if stdin.strip() else None  # empty: not JSON, no json import
        if isinstance(obj, dict) and isinstance(obj.get("log_file"), str) and os.path.isabs(obj["log_file"]):
            return str(obj["log_file"])
    except (ValueError, RecursionError):
        pass
    return environ.get(LOG_FILE_ENV) or DEFAULT_LOG_FILE


def run(environ: Mapping[str, str], stdin: bytes, relayed: Relayed | None = None) -> tuple[int, str]:
    """One invocation: (exit status, text for stdout). `relayed`: how the launcher's relay of this command
    to an agent went, when it tried and the agent did not run it."""
    started = time.monotonic()
    log = JsonLog(early_log_file(stdin, environ), cmd=environ.get("CNI_COMMAND", ""))
    log.bind(container_id=environ.get("CNI_CONTAINERID", "")[:128], netns=environ.get("CNI_NETNS", "")[:256])
    version = netconf.requested_version(stdin) or netconf.LATEST_VERSION
    try:
        env = cni_env.parse_env(environ)
        if env.command == "VERSION":
            return 0, jsoncodec.dumps(version_info(stdin)) + "\n"
        log.bind(pod=env.k8s.name, namespace=env.k8s.namespace)
        conf = netconf.parse_config(stdin, env.command)
        version = conf.cni_version
        log.configure(conf.log_file, conf.log_level)
        output: dict[str, Any] | None = None
        if env.command == "ADD":
            output = cmd_add(env, conf, log, relayed)
        elif env.command == "DEL":
            cmd_del(env, conf, log, relayed)
        elif env.command == "CHECK":
            if version.startswith("0.3."):
                raise CniError(
                    errors.INCOMPATIBLE_VERSION, "CHECK needs cniVersion 0.4.0 or later", f"config has {version}"
                )
            cmd_check(env, conf, log)
        elif env.command == "STATUS":
            cmd_status(conf, log)
        else:
            cmd_gc(conf, log)
        elapsed = round((time.monotonic() - started) * 1000, 2)
        log.info("done", f"{env.command} ok", duration_ms=elapsed)
        return 0, (jsoncodec.dumps(output) + "\n") if output is not None else ""
    except CniError as exc:
        return failed(exc, version, log)
    except Exception as exc:  # a bug: still answer in the CNI format
        return failed(internal_error(exc), version, log)


def internal_error(exc: Exception) -> CniError:
    return CniError(errors.INTERNAL_ERROR, "internal error in headrace-cni", f"{type(exc).__name__}: {exc}")


def failed(exc: CniError, version: str, log: JsonLog) -> tuple[int, str]:
    """The exit status and stdout of a failed invocation: the CNI error object, logged."""
    log.error("error", exc.msg, code=exc.code, details=exc.details)
    return 1, jsoncodec.dumps(exc.to_dict(version)) + "\n"


def main(stdin: bytes | None = None, relay_socket: str = "", relayed: Answer | None = None) -> int:
    """Run with the process's environment; print the result. `stdin`: the configuration when the
    launcher read it already; `relayed`: its relay's answer (not "done") to the agent at `relay_socket`."""
    if stdin is None:
        try:
            stdin = sys.stdin.buffer.read() if sys.stdin is not None else b""
        except OSError:
            stdin = b""
    note = (relay_socket, relayed.kind, relayed.msg) if relayed is not None else None
    status, text = run(os.environ, stdin, note)
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()
    return status
