"""CNI error object and the error codes headrace-cni uses.

Spec codes (CNI 1.1.0, "Error" section) where they fit; our own codes start at 100. Every failure the
plugin reports is a ``CniError``; ``plugin.main`` prints it as the spec's JSON error object on stdout and
exits 1. The table is documented in docs/cni-plugin.md.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)

if TYPE_CHECKING:
    from typing import Any

# --- spec codes -------------------------------------------------------------------------------------
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_NETWORK_CONFIG = 7
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50  # STATUS: the plugin cannot serve ADD now

# --- headrace codes (>= 100) --------------------------------------------------------------------------
POD_METADATA_UNAVAILABLE = 100
INVALID_ANNOTATION = 101
REDIRECT_FAILED = 102
AGENT_UNREACHABLE = 103
AGENT_REFUSED = 104
CHECK_FAILED = 105
NETNS_UNAVAILABLE = 106
INTERNAL_ERROR = 199

CODE_NAMES: dict[int, str] = {
    INCOMPATIBLE_VERSION: "incompatible CNI version",
    UNSUPPORTED_FIELD: "unsupported field in network configuration",
    UNKNOWN_CONTAINER: "container unknown or does not exist",
    INVALID_NETWORK_CONFIG: "invalid network configuration",
    IO_FAILURE: "I/O failure",
    DECODE_FAILURE: "failed to decode content",
    INVALID_ENV: "invalid necessary environment variables",
    TRY_AGAIN_LATER: "try again later",
    PLUGIN_NOT_AVAILABLE: "plugin not available",
    POD_METADATA_UNAVAILABLE: "pod metadata unavailable",
    INVALID_ANNOTATION: "invalid pod annotation",
    REDIRECT_FAILED: "redirect rules could not be applied or removed",
    AGENT_UNREACHABLE: "headrace agent unreachable or timed out",
    AGENT_REFUSED: "headrace agent refused the pod",
    CHECK_FAILED: "pod redirect missing or altered",
    NETNS_UNAVAILABLE: "pod network namespace unusable",
    INTERNAL_ERROR: "internal error",
}


class CniError(Exception):
    """A failure reported to the runtime as a CNI error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    def __repr__(self) -> str:
        return f"CniError({self.code}, {self.msg!r}, {self.details!r})"
