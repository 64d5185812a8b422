"""Network namespaces for tests: create/delete named netns, run commands inside (entering one from a thread:
cni.kernel.netns.entered)."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass


def run_in(
    netns_path: str | None, argv: Sequence[str], check: bool = True, **kw: object
) -> subprocess.CompletedProcess[str]:
    """Run argv inside netns_path (None = here) with nsenter; text output captured."""
    full = ["nsenter", f"--net={netns_path}", "--", *argv] if netns_path else list(argv)
    return subprocess.run(full, check=check, capture_output=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]


def unique(prefix: str, length: int = 6) -> str:
    return f"{prefix}{secrets.token_hex(length // 2)}"


@dataclass
class NetNS:
    """A named netns under /run/netns (made with `ip netns add`), `lo` up; delete() removes it."""

    name: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    @classmethod
    def create(cls, prefix: str = "hrt-") -> NetNS:
        ns = cls(unique(prefix, 8))
        subprocess.run(["ip", "netns", "add", ns.name], check=True, capture_output=True)
        try:
            ns.run(["ip", "link", "set", "lo", "up"])
            # No IPv6 duplicate-address detection in test namespaces: addresses are usable at once.
            ns.sysctl("net.ipv6.conf.all.accept_dad", "0")
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0")
        except BaseException:
            ns.delete()
            raise
        return ns

    def run(self, argv: Sequence[str], check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
        return run_in(self.path, argv, check=check, **kw)

    def sysctl(self, key: str, value: str) -> None:
        """Set a sysctl inside this netns only (/proc/sys/net is per netns)."""
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def inode(self) -> int:
        return os.stat(self.path).st_ino

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=False, capture_output=True)

    def exists(self) -> bool:
        return os.path.exists(self.path)
