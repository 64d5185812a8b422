"""On/off switches in the agent's environment (`HEADRACE_IPTC_CHECK`, `HEADRACE_RULES_HELPER`,
`HEADRACE_XT_CHANGE_COUNT`): unset or anything but 0/false/no/off is on."""

from __future__ import annotations

import os
from collections.abc import Mapping

OFF = ("0", "false", "no", "off")


def switched_on(name: str, environ: Mapping[str, str] | None = None) -> bool:
    return (os.environ if environ is None else environ).get(name, "1").strip().lower() not in OFF
