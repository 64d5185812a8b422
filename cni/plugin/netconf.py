"""Parse what the runtime hands the plugin: the CNI_* environment and the network configuration on stdin.

Everything is validated here, once, into small immutable records; the rest of the plugin trusts them. Errors
are ``CniError`` with the spec code that fits (6 undecodable input, 4 invalid config, 1 unsupported
version, 7 invalid environment).
"""

from __future__ import annotations

import os

from cni.contract import jsoncodec
from cni.contract.errors import DECODE_FAILURE, INCOMPATIBLE_VERSION, INVALID_ENV, INVALID_NETWORK_CONFIG, CniError
from cni.contract.record import Record
from cni.plugin.log import DEFAULT_LOG_FILE, LEVELS

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

SUPPORTED_VERSIONS: tuple[str, ...] = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = "1.1.0"
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
DEFAULT_AGENT_SOCKET = "/var/run/headrace/cni.sock"
DEFAULT_AGENT_TIMEOUT = 25.0
DEFAULT_API_TIMEOUT = 5.0
BACKENDS = ("auto", "iptables", "ebpf")
IPTABLES_FLAVOURS = ("auto", "legacy", "nft")
VALID_ATTACHMENTS_KEY = "cni.dev/valid-attachments"
# podman sends only K8S_POD_NAME (the container name): such pods are looked up in this namespace.
ASSUMED_NAMESPACE = "default"

# Names are checked with str methods, not `re`: importing `re` (and `enum` with it) costs the plugin
# several milliseconds of start-up. Each function states the regular expression it implements.
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_ID_CHARS = _ALNUM | frozenset("_.-")
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


def _is_id(value: str, max_len: int) -> bool:
    """``[A-Za-z0-9][A-Za-z0-9_.\\-]{0,max_len-1}`` (full match)."""
    return 0 < len(value) <= max_len and value[0] in _ALNUM and _ID_CHARS.issuperset(value)


def _is_container_id(value: str) -> bool:
    return _is_id(value, 1024)


def _is_uid(value: str) -> bool:
    return _is_id(value, 128)


def _is_label(value: str) -> bool:
    """A DNS label part without length limit: ``[a-z0-9]([-a-z0-9]*[a-z0-9])?``."""
    return bool(value) and _LABEL_CHARS.issuperset(value) and value[0] != "-" and value[-1] != "-"


def _is_dns_label(value: str) -> bool:
    """``[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?`` (full match)."""
    return len(value) <= 63 and _is_label(value)


def _is_dns_subdomain(value: str) -> bool:
    """``[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*`` (full match; no length limit)."""
    return all(_is_label(part) for part in value.split("."))


def _bad_ifname_char(value: str) -> bool:
    """``[/:\\s]`` found anywhere (``\\s``: Unicode whitespace, as ``str.isspace``)."""
    return any(c == "/" or c == ":" or c.isspace() for c in value)


class K8sArgs(Record):
    """The Kubernetes identity of the pod from CNI_ARGS ("" where not given)."""

    __slots__ = ("infra_container_id", "name", "namespace", "namespace_assumed", "uid")
    namespace: str
    name: str
    uid: str
    infra_container_id: str
    namespace_assumed: bool

    def __init__(
        self,
        namespace: str = "",
        name: str = "",
        uid: str = "",
        infra_container_id: str = "",
        namespace_assumed: bool = False,
    ) -> None:
        self._init(
            namespace=namespace,
            name=name,
            uid=uid,
            infra_container_id=infra_container_id,
            namespace_assumed=namespace_assumed,
        )

    @property
    def known(self) -> bool:
        return bool(self.namespace and self.name)


_NO_K8S = K8sArgs()


class CniEnv(Record):
    __slots__ = ("args", "command", "container_id", "ifname", "k8s", "netns", "path")
    command: str
    container_id: str
    netns: str
    ifname: str
    args: str
    path: str
    k8s: K8sArgs

    def __init__(
        self,
        command: str,
        container_id: str = "",
        netns: str = "",
        ifname: str = "",
        args: str = "",
        path: str = "",
        k8s: K8sArgs = _NO_K8S,
    ) -> None:
        self._init(
            command=command, container_id=container_id, netns=netns, ifname=ifname, args=args, path=path, k8s=k8s
        )


class Attachment(Record):
    __slots__ = ("container_id", "ifname")
    container_id: str
    ifname: str

    def __init__(self, container_id: str, ifname: str) -> None:
        self._init(container_id=container_id, ifname=ifname)


class NetConf(Record):
    __slots__ = (
        "agent_socket",
        "agent_timeout",
        "api_timeout",
        "backend",
        "cni_version",
        "exclude_namespaces",
        "iptables",
        "kubeconfig",
        "log_file",
        "log_level",
        "name",
        "objects_dir",
        "prev_result",
        "type",
        "valid_attachments",
    )
    cni_version: str
    name: str
    type: str
    kubeconfig: str | None
    objects_dir: str | None
    agent_socket: str
    backend: str
    iptables: str
    exclude_namespaces: tuple[str, ...]
    log_file: str
    log_level: str
    agent_timeout: float
    api_timeout: float
    prev_result: dict[str, Any] | None
    valid_attachments: tuple[Attachment, ...] | None

    def __init__(
        self,
        cni_version: str,
        name: str,
        type: str,
        kubeconfig: str | None = None,
        objects_dir: str | None = None,
        agent_socket: str = DEFAULT_AGENT_SOCKET,
        backend: str = "auto",
        iptables: str = "auto",
        exclude_namespaces: tuple[str, ...] = ("kube-system",),
        log_file: str = DEFAULT_LOG_FILE,
        log_level: str = "info",
        agent_timeout: float = DEFAULT_AGENT_TIMEOUT,
        api_timeout: float = DEFAULT_API_TIMEOUT,
        prev_result: dict[str, Any] | None = None,
        valid_attachments: tuple[Attachment, ...] | None = None,
    ) -> None:
        self._init(
            cni_version=cni_version,
            name=name,
            type=type,
            kubeconfig=kubeconfig,
            objects_dir=objects_dir,
            agent_socket=agent_socket,
            backend=backend,
            iptables=iptables,
            exclude_namespaces=exclude_namespaces,
            log_file=log_file,
            log_level=log_level,
            agent_timeout=agent_timeout,
            api_timeout=api_timeout,
            prev_result=prev_result,
            valid_attachments=valid_attachments,
        )


# ---------------------------------------------------------------------------------------------------
# environment


def _env_error(msg: str, details: str = "") -> CniError:
    return CniError(INVALID_ENV, msg, details)


def parse_cni_args(raw: str) -> K8sArgs:
    """CNI_ARGS: ``K=V`` pairs separated by ';'. Unknown keys are ignored; K8S_* values are validated."""
    values: dict[str, str] = {}
    for piece in raw.split(";"):
        if piece == "":
            continue
        key, sep, value = piece.partition("=")
        if not sep or not key:
            raise _env_error("CNI_ARGS is malformed", f"expected KEY=VALUE, got {piece[:80]!r}")
        values[key] = value
    namespace = values.get("K8S_POD_NAMESPACE", "")
    name = values.get("K8S_POD_NAME", "")
    uid = values.get("K8S_POD_UID", "")
    infra = values.get("K8S_POD_INFRA_CONTAINER_ID", "")
    if namespace and not _is_dns_label(namespace):
        raise _env_error("CNI_ARGS K8S_POD_NAMESPACE is not a valid namespace name", repr(namespace[:80]))
    if uid and not _is_uid(uid):
        raise _env_error("CNI_ARGS K8S_POD_UID is not a valid UID", repr(uid[:80]))
    if infra and not _is_container_id(infra):
        raise _env_error("CNI_ARGS K8S_POD_INFRA_CONTAINER_ID is not a valid container ID", repr(infra[:80]))
    valid_name = bool(name) and len(name) <= 253 and _is_dns_subdomain(name)
    if namespace:
        if not name:
            raise _env_error("CNI_ARGS has K8S_POD_NAMESPACE but no K8S_POD_NAME")
        if not valid_name:
            raise _env_error("CNI_ARGS K8S_POD_NAME is not a valid pod name", repr(name[:80]))
        return K8sArgs(namespace, name, uid, infra)
    if valid_name:
        # podman (CNI backend) passes the container name as K8S_POD_NAME and no namespace.
        return K8sArgs(ASSUMED_NAMESPACE, name, uid, infra, namespace_assumed=True)
    # A name that is no Kubernetes name (podman container names may hold '_' or capitals): no pod identity.
    return K8sArgs("", "", uid, infra)


def parse_env(environ: Mapping[str, str]) -> CniEnv:
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise _env_error("CNI_COMMAND is not set")
    if command not in COMMANDS:
        raise _env_error(f"unknown CNI_COMMAND {command[:40]!r}", f"supported: {', '.join(COMMANDS)}")
    if command in ("VERSION", "STATUS", "GC"):
        return CniEnv(command=command, path=environ.get("CNI_PATH", ""))
    container_id = environ.get("CNI_CONTAINERID", "")
    if not container_id:
        raise _env_error("CNI_CONTAINERID is not set")
    if not _is_container_id(container_id):
        raise _env_error(
            "CNI_CONTAINERID is invalid",
            f"must start with a letter or digit and hold only letters, digits, '_', '.', '-': {container_id[:80]!r}",
        )
    ifname = environ.get("CNI_IFNAME", "")
    if not ifname:
        raise _env_error("CNI_IFNAME is not set")
    if len(ifname) > 15 or ifname in (".", "..") or _bad_ifname_char(ifname):
        raise _env_error("CNI_IFNAME is not a valid interface name", repr(ifname[:80]))
    netns = environ.get("CNI_NETNS", "")
    if command in ("ADD", "CHECK") and not netns:
        raise _env_error("CNI_NETNS is not set", f"{command} needs the pod's network namespace")
    if netns and not os.path.isabs(netns):
        raise _env_error("CNI_NETNS must be an absolute path", repr(netns[:200]))
    raw_args = environ.get("CNI_ARGS", "")
    return CniEnv(
        command=command,
        container_id=container_id,
        netns=netns,
        ifname=ifname,
        args=raw_args,
        path=environ.get("CNI_PATH", ""),
        k8s=parse_cni_args(raw_args),
    )


# ---------------------------------------------------------------------------------------------------
# network configuration


def _config_error(msg: str, details: str = "") -> CniError:
    return CniError(INVALID_NETWORK_CONFIG, msg, details)


def decode_json_object(data: bytes, what: str = "network configuration") -> dict[str, Any]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CniError(DECODE_FAILURE, f"{what} is not UTF-8", str(exc)) from exc
    if not text.strip():
        raise CniError(DECODE_FAILURE, f"{what} is empty", "expected a JSON object on stdin")
    try:
        obj = jsoncodec.loads(text)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, ValueError) and not jsoncodec.is_decode_error(exc):
            raise
        raise CniError(DECODE_FAILURE, f"{what} is not valid JSON", str(exc)[:300]) from exc
    if not isinstance(obj, dict):
        raise CniError(DECODE_FAILURE, f"{what} must be a JSON object", f"got {type(obj).__name__}")
    return obj


def requested_version(data: bytes) -> str | None:
    """Best effort: the cniVersion the runtime asked for (to format errors), None if not readable."""
    if not data.strip():  # e.g. VERSION with empty stdin: not JSON (decided without importing json)
        return None
    try:
        obj = jsoncodec.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, ValueError) and not (isinstance(exc, UnicodeDecodeError) or jsoncodec.is_decode_error(exc)):
            raise
        return None
    if isinstance(obj, dict):
        version = obj.get("cniVersion")
        if isinstance(version, str) and version in SUPPORTED_VERSIONS:
            return version
    return None


def _opt_str(obj: dict[str, Any], key: str, default: str | None = None) -> str | None:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _config_error(f"field {key!r} must be a string", f"got {type(value).__name__}")
    return value


def _req_str(obj: dict[str, Any], key: str) -> str:
    if key not in obj:
        raise _config_error(f"field {key!r} is required")
    value = _opt_str(obj, key)
    if not value:
        raise _config_error(f"field {key!r} must be a non-empty string")
    return value


def _choice(obj: dict[str, Any], key: str, choices: tuple[str, ...], default: str) -> str:
    value = _opt_str(obj, key, default) or default
    if value not in choices:
        raise _config_error(f"field {key!r} must be one of {', '.join(choices)}", f"got {value[:40]!r}")
    return value


def _abs_path(obj: dict[str, Any], key: str, default: str | None = None) -> str | None:
    value = _opt_str(obj, key, default)
    if value is None or value == "":
        return default
    if not os.path.isabs(value) or "\x00" in value:
        raise _config_error(f"field {key!r} must be an absolute path", repr(value[:200]))
    return value


def _seconds(obj: dict[str, Any], key: str, default: float) -> float:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _config_error(f"field {key!r} must be a number of seconds", f"got {type(value).__name__}")
    if not 0 < value <= 300:
        raise _config_error(f"field {key!r} must be > 0 and <= 300 seconds", f"got {value}")
    return float(value)


def _namespaces(obj: dict[str, Any]) -> tuple[str, ...]:
    value = obj.get("exclude_namespaces", ["kube-system"])
    if not isinstance(value, list):
        raise _config_error("field 'exclude_namespaces' must be a list of namespace names")
    out: list[str] = []
    for item in value:
        if not isinstance(item, str) or not _is_dns_label(item):
            raise _config_error("field 'exclude_namespaces' holds an invalid namespace name", repr(item)[:80])
        out.append(item)
    return tuple(out)


def _attachments(obj: dict[str, Any]) -> tuple[Attachment, ...] | None:
    if VALID_ATTACHMENTS_KEY not in obj:
        return None
    value = obj[VALID_ATTACHMENTS_KEY]
    if not isinstance(value, list):
        raise _config_error(f"field {VALID_ATTACHMENTS_KEY!r} must be a list")
    out: list[Attachment] = []
    for item in value:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("containerID"), str)
            or not isinstance(item.get("ifname"), str)
        ):
            raise _config_error(
                f"field {VALID_ATTACHMENTS_KEY!r} entries must be objects with string containerID and ifname"
            )
        out.append(Attachment(item["containerID"], item["ifname"]))
    return tuple(out)


def parse_config(data: bytes, command: str) -> NetConf:
    obj = decode_json_object(data)
    version = obj.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise _config_error("field 'cniVersion' is required and must be a string")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"unsupported cniVersion {version[:20]!r}",
            f"supported versions: {', '.join(SUPPORTED_VERSIONS)}",
        )
    name = _req_str(obj, "name")
    plugin_type = _req_str(obj, "type")
    kubeconfig = _abs_path(obj, "kubeconfig")
    objects_dir = _abs_path(obj, "objects_dir")
    if kubeconfig and objects_dir:
        raise _config_error("set only one of 'kubeconfig' and 'objects_dir'")
    if command in ("ADD", "DEL", "CHECK") and not (kubeconfig or objects_dir):
        raise _config_error("a pod source is required: set 'kubeconfig' or 'objects_dir'")
    prev = obj.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise _config_error("field 'prevResult' must be an object")
    if command in ("ADD", "CHECK") and prev is None:
        raise _config_error(
            f"{command} needs 'prevResult'",
            "headrace-cni is a chained plugin: list it after the plugin that creates the interface",
        )
    level = _choice(obj, "log_level", tuple(LEVELS), "info")
    return NetConf(
        cni_version=version,
        name=name,
        type=plugin_type,
        kubeconfig=kubeconfig,
        objects_dir=objects_dir,
        agent_socket=_abs_path(obj, "agent_socket", DEFAULT_AGENT_SOCKET) or DEFAULT_AGENT_SOCKET,
        backend=_choice(obj, "backend", BACKENDS, "auto"),
        iptables=_choice(obj, "iptables", IPTABLES_FLAVOURS, "auto"),
        exclude_namespaces=_namespaces(obj),
        log_file=_abs_path(obj, "log_file", DEFAULT_LOG_FILE) or DEFAULT_LOG_FILE,
        log_level=level,
        agent_timeout=_seconds(obj, "agent_timeout", DEFAULT_AGENT_TIMEOUT),
        api_timeout=_seconds(obj, "api_timeout", DEFAULT_API_TIMEOUT),
        prev_result=prev,
        valid_attachments=_attachments(obj),
    )
