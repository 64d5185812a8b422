"""Parse the network configuration the runtime hands the plugin on stdin (the CNI_* environment: cni_env.py).

Everything is validated here, once, into small immutable records; the rest of the plugin trusts them. Errors
are ``CniError`` with the spec code that fits (6 undecodable input, 4 invalid config, 1 unsupported
version).
"""

from __future__ import annotations

import os

from cni.contract import jsoncodec
from cni.contract.errors import DECODE_FAILURE, INCOMPATIBLE_VERSION, INVALID_NETWORK_CONFIG, CniError
from cni.contract.record import Record
from cni.plugin.launch import DEFAULT_AGENT_SOCKET
from cni.plugin.log import DEFAULT_LOG_FILE, LEVELS
from cni.plugin.names import is_dns_label

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from typing import Any

SUPPORTED_VERSIONS: tuple[str, ...] = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = "1.1.0"
DEFAULT_AGENT_TIMEOUT = 25.0
DEFAULT_API_TIMEOUT = 5.0
BACKENDS = ("auto", "iptables", "nftables", "ebpf")
IPTABLES_FLAVOURS = ("auto", "legacy", "nft")
VALID_ATTACHMENTS_KEY = "cni.dev/valid-attachments"


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
    except (ValueError, RecursionError) as exc:  # every ValueError of a decode is about the text
        raise CniError(DECODE_FAILURE, f"{what} is not valid JSON", str(exc)[:300]) from exc
    if not isinstance(obj, dict):
        raise CniError(DECODE_FAILURE, f"{what} must be a JSON object", f"got {type(obj).__name__}")
    return obj


def requested_version(data: bytes, *, supported_only: bool = True) -> str | None:
    """Best effort: the cniVersion the runtime asked for (to format errors), None if not readable (or, with
    `supported_only`, not one of ours)."""
    if not data.strip():  # e.g. VERSION with empty stdin: not JSON (decided without importing json)
        return None
    try:
        obj = jsoncodec.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if isinstance(obj, dict):
        version = obj.get("cniVersion")
        if isinstance(version, str) and (version in SUPPORTED_VERSIONS or not supported_only):
            return version[:64]
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
        if not isinstance(item, str) or not is_dns_label(item):
            raise _config_error("field 'exclude_namespaces' holds an invalid namespace name", repr(item)[:80])
        out.append(item)
    return tuple(out)


def _attachments(obj: dict[str, Any]) -> tuple[Attachment, ...] | None:
    if VALID_ATTACHMENTS_KEY not in obj:
        return None
    value = obj[VALID_ATTACHMENTS_KEY]
    if value is None:  # libcni writes a nil slice (a network with no attachment left) as null
        return ()
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
