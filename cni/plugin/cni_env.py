"""The CNI_* environment the runtime starts the plugin with, validated into `CniEnv` (with the pod's
Kubernetes identity from CNI_ARGS). Errors are ``CniError`` code 7 (invalid environment).
"""

from __future__ import annotations

import os

from cni.contract.errors import INVALID_ENV, CniError
from cni.contract.record import Record
from cni.plugin.names import bad_ifname_char, is_container_id, is_dns_label, is_dns_subdomain, is_uid

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Mapping

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
# podman sends only K8S_POD_NAME (the container name): such pods are looked up in this namespace.
ASSUMED_NAMESPACE = "default"


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
    if namespace and not is_dns_label(namespace):
        raise _env_error("CNI_ARGS K8S_POD_NAMESPACE is not a valid namespace name", repr(namespace[:80]))
    if uid and not is_uid(uid):
        raise _env_error("CNI_ARGS K8S_POD_UID is not a valid UID", repr(uid[:80]))
    if infra and not is_container_id(infra):
        raise _env_error("CNI_ARGS K8S_POD_INFRA_CONTAINER_ID is not a valid container ID", repr(infra[:80]))
    valid_name = bool(name) and len(name) <= 253 and is_dns_subdomain(name)
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
    if not is_container_id(container_id):
        raise _env_error(
            "CNI_CONTAINERID is invalid",
            f"must start with a letter or digit and hold only letters, digits, '_', '.', '-': {container_id[:80]!r}",
        )
    ifname = environ.get("CNI_IFNAME", "")
    if not ifname:
        raise _env_error("CNI_IFNAME is not set")
    if len(ifname) > 15 or ifname in (".", "..") or bad_ifname_char(ifname):
        raise _env_error("CNI_IFNAME is not a valid interface name", repr(ifname[:80]))
    netns = environ.get("CNI_NETNS", "")
    if command in ("ADD", "CHECK") and not netns:
        raise _env_error("CNI_NETNS is not set", f"{command} needs the pod's network namespace")
    if netns and not os.path.isabs(netns):
        raise _env_error("CNI_NETNS must be an absolute path", repr(netns[:200]))
    raw_args = environ.get("CNI_ARGS", "")
    try:
        k8s = parse_cni_args(raw_args)
    except CniError:
        if command != "DEL":
            raise
        k8s = _NO_K8S  # a DEL does not fail on what its ADD refused: the pod never got past that ADD
    return CniEnv(
        command=command,
        container_id=container_id,
        netns=netns,
        ifname=ifname,
        args=raw_args,
        path=environ.get("CNI_PATH", ""),
        k8s=k8s,
    )
