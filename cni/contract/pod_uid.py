"""The pod uid rule, the one validator of it: the agent names files and directories after a pod's uid
(netns pins, enrolment records, bpffs pin directories), the plugin checks the runtime's K8S_POD_UID and
the agent every uid a client sends it.

A valid uid is 1-128 characters of ``[0-9A-Za-z._-]``, the first a letter or digit (so never ``.``, ``..``,
a path, whitespace or a newline). Checked with str methods, not ``re`` (the plugin's start-up cost).
"""

from __future__ import annotations

UID_MAX_LEN = 128
_UID_FIRST = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_UID_CHARS = _UID_FIRST | frozenset("._-")


class InvalidUid(ValueError):
    """A pod uid that breaks the rule above."""


def valid_uid(uid: object) -> bool:
    """Whether `uid` is a string that follows the pod uid rule."""
    return (
        isinstance(uid, str)
        and 0 < len(uid) <= UID_MAX_LEN
        and uid[0] in _UID_FIRST
        and _UID_CHARS.issuperset(uid)
    )


def check_uid(uid: object) -> str:
    """`uid` itself when it is valid; InvalidUid (naming it) otherwise."""
    if not valid_uid(uid):
        shown = repr(uid[:80] if isinstance(uid, str) else uid)
        rule = f"1-{UID_MAX_LEN} of [0-9A-Za-z._-], starting with a letter or digit"
        raise InvalidUid(f"invalid pod uid {shown} ({rule})")
    assert isinstance(uid, str)
    return uid
