"""The node-level programs of ambient mode on the node proxy's cgroup v2 directory (the proxy's accepted
sockets live there, not in the pods' cgroups): `getsockopt` (SO_ORIGINAL_DST) and `sock_ops` (an accepted
inbound connection's rewrite state kept on its socket), shared by every ambient pod, pinned under the node
dir of the backend's bpffs.

Where it is attached is recorded in a file outside the bpffs: a legacy cgroup attachment cannot be looked up
from the program, and the agent's idea of the proxy cgroup may change, or be unknown, after a restart.

When the node's last eBPF pod leaves (its label removed, or moved to another backend) they stay GRACE
seconds more (`release`): the proxy may have accepted a connection that pod's programs redirected and not
asked for its original destination yet; without them it would be told the proxy's own address, and drop
the connection.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from node_agent.backends.base import BackendError
from node_agent.backends.ebpf import bpfsys, loader, pinning
from node_agent.backends.ebpf.attach import Cgroup, CgroupError, validate_cgroup

log = logging.getLogger("headrace.backend.ebpf")

PROXY_GETSOCKOPT = "hr_getsockopt_proxy"
# (program, its pin name under the node dir): getsockopt answers SO_ORIGINAL_DST for the proxy's accepted
# sockets; sock_ops keeps each accepted inbound connection's rewrite state on the socket (hr_in_orig) and
# drops its SO_ORIGINAL_DST entry when it closes
PROXY_PROGRAMS = (("hr_getsockopt", PROXY_GETSOCKOPT), ("hr_sockops", "hr_sockops_proxy"))
GRACE = 2.0  # seconds the programs outlive the node's last eBPF pod (`release`)


class ProxyOrigDst:
    """The proxy cgroup's programs: attach (idempotent), check, detach."""

    def __init__(self, state_dir: Path, lock: threading.RLock, max_age: float = 0.5) -> None:
        """lock: the backend's, held for every change to the node's pods (`release` takes it later)."""
        self.state_dir = state_dir
        self.lock = lock
        self._release: threading.Timer | None = None
        # problems() is node-wide but asked in every ambient pod's check: one answer serves all the pods
        # checked within max_age seconds (a detached program is still seen well within the 2 s target)
        self.max_age = max_age
        self._last: tuple[float, str | None, Path, list[str]] | None = None

    @staticmethod
    def pinned_path(root: Path, pin: str = PROXY_GETSOCKOPT) -> Path:
        return root / pinning.NODE_DIR / pin

    def ensure(
        self,
        proxy_cgroup: str | None,
        root: Path,
        obj: Callable[[], loader.CompiledObject],
        node_fds: dict[str, int],
    ) -> None:
        """The node-level programs on the node proxy's cgroup (ambient), shared by all pods; idempotent.
        obj gives the compiled object, asked for only when a program must be loaded. Every ambient pod's
        apply asks: found in place within max_age (by this or by `problems`), nothing is read again."""
        if self._fresh(proxy_cgroup, root):
            return
        try:
            cg = validate_cgroup(proxy_cgroup)
            recorded = self._attached_cgroup()
            if recorded is not None and recorded != str(cg):
                self._detach_from(root, recorded)  # attached by an earlier run to another cgroup
            with Cgroup(cg) as c:
                attached = [self._ensure_one(c, prog_name, self.pinned_path(root, pin), obj, node_fds)
                            for prog_name, pin in PROXY_PROGRAMS]
            self._record_attached(str(cg))
            self._last = (time.monotonic(), proxy_cgroup, root, [])
        except (CgroupError, bpfsys.BpfSysError, OSError) as e:
            raise BackendError(
                f"cannot attach the original-destination programs to the proxy cgroup {proxy_cgroup}: {e}"
            ) from e
        if any(attached):  # else found in place (asked again each max_age while pods are applied)
            log.info(
                "ebpf proxy programs attached", extra={"event": "ebpf_proxy_attached", "cgroup": str(proxy_cgroup)}
            )

    @staticmethod
    def _ensure_one(
        c: Cgroup, prog_name: str, path: Path, obj: Callable[[], loader.CompiledObject], node_fds: dict[str, int]
    ) -> bool:
        """Whether the program had to be attached (False: found attached)."""
        atype = loader.PROGRAMS[prog_name][1]
        fd = pinning.open_pinned(path)
        try:
            if fd is not None and bpfsys.prog_info(fd).prog_id in c.attached(atype):
                return False
            if fd is None:
                prog = obj().programs[prog_name]
                fd = bpfsys.prog_load(prog.prog_type, prog.patched(node_fds), prog_name, prog.attach_type,
                                      loader.LICENSE)
                pinning.pin(fd, path)
            c.attach(fd, atype)
            return True
        finally:
            if fd is not None:
                os.close(fd)

    def pinned(self, root: Path) -> bool:
        """Whether any of the programs is pinned (attached or not)."""
        return any(self.pinned_path(root, pin).exists() for _prog_name, pin in PROXY_PROGRAMS)

    def _fresh(self, proxy_cgroup: str | None, root: Path) -> bool:
        """Found in place, for this cgroup and root, within max_age."""
        last = self._last
        return (
            last is not None and time.monotonic() - last[0] < self.max_age and last[1:3] == (proxy_cgroup, root)
            and not last[3]
        )

    def problems(self, proxy_cgroup: str | None, root: Path) -> list[str]:
        now = time.monotonic()
        last = self._last
        if last is not None and now - last[0] < self.max_age and last[1:3] == (proxy_cgroup, root):
            return list(last[3])
        found = self._problems(proxy_cgroup, root)
        self._last = (now, proxy_cgroup, root, found) if not found else None  # a problem: look again next time
        return found

    def _problems(self, proxy_cgroup: str | None, root: Path) -> list[str]:
        found: list[str] = []
        for prog_name, pin in PROXY_PROGRAMS:
            path = self.pinned_path(root, pin)
            fd = pinning.open_pinned(path)
            if fd is None:
                found.append(f"original-destination program for the proxy cgroup is not pinned ({path})")
                continue
            try:
                pid = bpfsys.prog_info(fd).prog_id
                with Cgroup(validate_cgroup(proxy_cgroup)) as c:
                    if pid not in c.attached(loader.PROGRAMS[prog_name][1]):
                        found.append(f"original-destination program {pin} is not attached to {proxy_cgroup}")
            except (CgroupError, bpfsys.BpfSysError) as e:
                return [f"proxy cgroup: {e}"]
            finally:
                os.close(fd)
        return found

    @property
    def _attached_file(self) -> Path:
        """Where the cgroup holding the node-level getsockopt program is recorded (outside the bpffs: a
        legacy cgroup attachment cannot be looked up from the program, and the agent's idea of the proxy
        cgroup may change, or be unknown, after a restart)."""
        return self.state_dir / "ebpf-proxy-getsockopt.cgroup"

    def _attached_cgroup(self) -> str | None:
        try:
            return self._attached_file.read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def _record_attached(self, cgroup: str) -> None:
        if self._attached_cgroup() == cgroup:
            return
        tmp = self._attached_file.with_suffix(".tmp")
        tmp.write_text(cgroup + "\n", encoding="utf-8")
        os.replace(tmp, self._attached_file)

    def _detach_from(self, root: Path, cgroup: str) -> None:
        if not Path(cgroup).is_dir():
            return  # the cgroup is gone, and its attachments with it
        with Cgroup(Path(cgroup)) as c:
            for prog_name, pin in PROXY_PROGRAMS:
                fd = pinning.open_pinned(self.pinned_path(root, pin))
                if fd is None:
                    continue
                try:
                    c.detach(fd, loader.PROGRAMS[prog_name][1])
                except bpfsys.BpfSysError as e:
                    if e.errno not in (errno.ENOENT, errno.EINVAL):
                        raise
                finally:
                    os.close(fd)

    def release(self, proxy_cgroup: str | None, root: Path) -> None:
        """The node's last pod left (lock held): detach GRACE seconds from now, under the lock, if no pod
        has come meanwhile (`detach` errors are then logged: a later ambient apply re-uses what is left)."""
        if self._release is not None:
            self._release.cancel()

        def later() -> None:
            with self.lock:
                if self._release is not timer:
                    return  # flushed or replaced meanwhile
                self._release = None
                try:
                    if not pinning.any_pod_dir(root):
                        self.detach(proxy_cgroup, root)
                except (CgroupError, bpfsys.BpfSysError, OSError) as e:
                    log.warning("ebpf proxy programs not detached", extra={"event": "ebpf_proxy_detach_failed",
                                                                           "reason": str(e)})

        timer = threading.Timer(GRACE, later)
        timer.daemon = True
        self._release = timer
        timer.start()

    def flush(self) -> None:
        """A pending `release` done now (the agent stops)."""
        with self.lock:
            timer = self._release
            if timer is not None:
                timer.cancel()
                timer.function()  # `later`: still the pending one, so it runs

    def move(self, old: str | None, new: str | None, root: Path, obj: Callable[[], loader.CompiledObject],
             node_fds: Callable[[], dict[str, int]]) -> None:
        """The proxy now runs in the cgroup `new` (validated by the caller): programs attached for it in
        `old` move there (none are attached while no ambient pod needs them)."""
        if self.pinned_path(root).exists():
            self.detach(old, root)
            if new is not None:
                self.ensure(new, root, obj, node_fds())

    def detach(self, proxy_cgroup: str | None, root: Path) -> None:
        """Detach the node-level programs from wherever they are attached (the recorded cgroup and the
        current proxy cgroup), then unpin them."""
        self._last = None
        for cgroup in {c for c in (self._attached_cgroup(), proxy_cgroup) if c is not None}:
            self._detach_from(root, cgroup)
        for _prog_name, pin in PROXY_PROGRAMS:
            pinning.unpin(self.pinned_path(root, pin))
        self._attached_file.unlink(missing_ok=True)
