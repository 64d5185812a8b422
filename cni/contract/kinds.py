"""The contract's type aliases: address family, IP network, sidecar inbound interception mode.

Imported at run time by spec.py (which needs ``ipaddress`` anyway); the plugin's light modules import
them only for type checking.
"""

from __future__ import annotations

import ipaddress
from typing import Literal, TypeAlias

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Family: TypeAlias = Literal[4, 6]
InterceptionMode: TypeAlias = Literal["REDIRECT", "TPROXY"]
