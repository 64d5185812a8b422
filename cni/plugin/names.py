"""Name rules of CNI and Kubernetes (container IDs, pod UIDs, namespace and pod names, interface names).

Checked with str methods, not `re`: importing `re` (and `enum` with it) costs the plugin several
milliseconds of start-up. Each function states the regular expression it implements.
"""

from __future__ import annotations

from cni.contract.pod_uid import valid_uid

_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_ID_CHARS = _ALNUM | frozenset("_.-")
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


def _is_id(value: str, max_len: int) -> bool:
    """``[A-Za-z0-9][A-Za-z0-9_.\\-]{0,max_len-1}`` (full match)."""
    return 0 < len(value) <= max_len and value[0] in _ALNUM and _ID_CHARS.issuperset(value)


def is_container_id(value: str) -> bool:
    return _is_id(value, 1024)


def is_uid(value: str) -> bool:
    """The pod uid rule of ``cni.contract.pod_uid`` (``[A-Za-z0-9][A-Za-z0-9_.\\-]{0,127}``)."""
    return valid_uid(value)


def _is_label(value: str) -> bool:
    """A DNS label part without length limit: ``[a-z0-9]([-a-z0-9]*[a-z0-9])?``."""
    return bool(value) and _LABEL_CHARS.issuperset(value) and value[0] != "-" and value[-1] != "-"


def is_dns_label(value: str) -> bool:
    """``[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?`` (full match)."""
    return len(value) <= 63 and _is_label(value)


def is_dns_subdomain(value: str) -> bool:
    """``[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*`` (full match; no length limit)."""
    return all(_is_label(part) for part in value.split("."))


def bad_ifname_char(value: str) -> bool:
    """``[/:\\s]`` found anywhere (``\\s``: Unicode whitespace, as ``str.isspace``)."""
    return any(c == "/" or c == ":" or c.isspace() for c in value)
