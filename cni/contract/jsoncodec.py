"""``loads``/``dumps`` for the plugin's hot path without importing the ``json`` package.

``import json`` costs about 10 ms of the plugin's start-up on a small node (``json.decoder`` compiles
regular expressions, which imports ``re``, ``enum``, ``functools``, ``collections``). The parsing and
encoding work itself is done by the C accelerator ``_json`` that ``json`` uses too; this module drives it
directly with ``json``'s default settings. Only a *successful* result is produced here: on any failure
(invalid JSON, unserializable object, ``_json`` missing or different) the call is repeated with the real
``json`` module, so the caller sees exactly the exception and message ``json`` would give. Every
``ValueError`` `loads` raises is about the text (``JSONDecodeError``, ``UnicodeDecodeError``, an integer
longer than Python's digit limit for ``int``).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

_WHITESPACE = " \t\n\r"  # json.decoder.WHITESPACE
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _ScannerContext:
    """The attributes ``_json.make_scanner`` reads from a ``json.JSONDecoder`` (default settings)."""

    __slots__ = ("object_hook", "object_pairs_hook", "parse_constant", "parse_float", "parse_int", "strict")

    def __init__(self) -> None:
        self.object_hook = None
        self.object_pairs_hook = None
        self.parse_float = float
        self.parse_int = int
        self.parse_constant = _CONSTANTS.__getitem__
        self.strict = True


_scan: Callable[[str, int], tuple[Any, int]] | None
_encode_str: Callable[[str], str] | None
try:
    import _json

    _scan = _json.make_scanner(_ScannerContext())  # type: ignore[arg-type]
    _encode_str = _json.encode_basestring_ascii
    _make_encoder = _json.make_encoder
except (ImportError, AttributeError, TypeError):  # pragma: no cover - another Python implementation
    _scan = None
    _encode_str = None


def _not_serializable(obj: object) -> Any:
    raise TypeError(f"Object of type {obj.__class__.__name__} is not JSON serializable")


def loads(text: str) -> Any:
    """``json.loads(text)`` for a ``str``."""
    if _scan is not None and isinstance(text, str) and not text.startswith("\ufeff"):
        start = len(text) - len(text.lstrip(_WHITESPACE))
        try:
            obj, end = _scan(text, start)
        except Exception:  # noqa: S110 - e.g. SystemError: _json reports errors via json.decoder (not loaded)
            pass  # let json raise its own error below
        else:
            if not text[end:].lstrip(_WHITESPACE):
                return obj
    import json

    return json.loads(text)


def loads_bytes(data: bytes) -> Any:
    """``json.loads(data)`` for ``bytes`` (which also accepts UTF-16/32 and a UTF-8 BOM: left to ``json``)."""
    if not data.startswith(b"\xef\xbb\xbf"):
        try:
            return loads(data.decode("utf-8"))
        except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError: json decides below
            pass
    import json

    return json.loads(data)


def dumps(obj: Any, *, separators: tuple[str, str] | None = None, default: Callable[[Any], Any] | None = None) -> str:
    """``json.dumps(obj, separators=..., default=...)`` with every other argument at its default."""
    if _encode_str is not None:
        try:
            if isinstance(obj, str):
                return _encode_str(obj)
            item_sep, key_sep = separators or (", ", ": ")
            encode = _make_encoder(
                {}, default or _not_serializable, _encode_str, None, key_sep, item_sep, False, False, True
            )
            return "".join(encode(obj, 0))
        except Exception:  # noqa: S110 - whatever it is, json raises its own error below
            pass
    import json

    return json.dumps(obj, separators=separators, default=default)
