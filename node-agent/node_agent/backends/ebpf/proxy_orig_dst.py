"""The node-level original-destination program of ambient mode: one `getsockopt` program attached to the
node proxy's cgroup v2 directory (the proxy's accepted sockets live there, not in the pods' cgroups), shared
by every ambient pod, pinned under the node dir of the backend's bpffs.

Where it is attached is recorded in a file outside the bpffs: a legacy cgroup attachment cannot be looked up
from the program, and the agent's idea of the proxy cgroup may change, or be unknown, after a restart.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

from node_agent.backends.base import BackendError
from node_agent.backends.ebpf import bpfsys, loader, pinning
from node_agent.backends.ebpf.attach import Cgroup, CgroupError, validate_cgroup

log = logging.getLogger("headrace.backend.ebpf")

PROXY_GETSOCKOPT = "hr_getsockopt_proxy"


class ProxyOrigDst:
    """The proxy cgroup's getsockopt program: attach (idempotent), check, detach."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    @staticmethod
    def pinned_path(root: Path) -> Path:
        return root / pinning.NODE_DIR / PROXY_GETSOCKOPT

    def ensure(
        self,
        proxy_cgroup: str | None,
        root: Path,
        obj: Callable[[], loader.CompiledObject],
        node_fds: dict[str, int],
    ) -> None:
        """One getsockopt program on the node proxy's cgroup (ambient), shared by all pods; idempotent.
        obj gives the compiled object, asked for only when the program must be loaded."""
        path = self.pinned_path(root)
        atype = loader.PROGRAMS["hr_getsockopt"][1]
        try:
            cg = validate_cgroup(proxy_cgroup)
            recorded = self._attached_cgroup()
            if recorded is not None and recorded != str(cg) and path.exists():
                self._detach_from(path, recorded)  # attached by an earlier run to another cgroup
            with Cgroup(cg) as c:
                fd = pinning.open_pinned(path)
                try:
                    if fd is not None and bpfsys.prog_info(fd).prog_id in c.attached(atype):
                        self._record_attached(str(cg))
                        return
                    if fd is None:
                        prog = obj().programs["hr_getsockopt"]
                        fd = bpfsys.prog_load(
                            prog.prog_type, prog.patched(node_fds), "hr_getsockopt", prog.attach_type, loader.LICENSE
                        )
                        pinning.pin(fd, path)
                    c.attach(fd, atype)
                    self._record_attached(str(cg))
                finally:
                    if fd is not None:
                        os.close(fd)
        except (CgroupError, bpfsys.BpfSysError, OSError) as e:
            raise BackendError(
                f"cannot attach the original-destination program to the proxy cgroup {proxy_cgroup}: {e}"
            ) from e
        log.info(
            "ebpf proxy getsockopt attached", extra={"event": "ebpf_proxy_attached", "cgroup": str(proxy_cgroup)}
        )

    def problems(self, proxy_cgroup: str | None, root: Path) -> list[str]:
        path = self.pinned_path(root)
        fd = pinning.open_pinned(path)
        if fd is None:
            return [f"original-destination program for the proxy cgroup is not pinned ({path})"]
        try:
            pid = bpfsys.prog_info(fd).prog_id
            with Cgroup(validate_cgroup(proxy_cgroup)) as c:
                if pid not in c.attached(loader.PROGRAMS["hr_getsockopt"][1]):
                    return [f"original-destination program is not attached to {proxy_cgroup}"]
        except (CgroupError, bpfsys.BpfSysError) as e:
            return [f"proxy cgroup: {e}"]
        finally:
            os.close(fd)
        return []

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

    def _detach_from(self, path: Path, cgroup: str) -> None:
        if not Path(cgroup).is_dir():
            return  # the cgroup is gone, and its attachments with it
        with Cgroup(Path(cgroup)) as c:
            fd = pinning.open_pinned(path)
            if fd is None:
                return
            try:
                c.detach(fd, loader.PROGRAMS["hr_getsockopt"][1])
            except bpfsys.BpfSysError as e:
                if e.errno not in (errno.ENOENT, errno.EINVAL):
                    raise
            finally:
                os.close(fd)

    def detach(self, proxy_cgroup: str | None, root: Path) -> None:
        """Detach the node-level getsockopt program from wherever it is attached (the recorded cgroup and
        the current proxy cgroup), then unpin it."""
        path = self.pinned_path(root)
        if path.exists():
            for cgroup in {c for c in (self._attached_cgroup(), proxy_cgroup) if c is not None}:
                self._detach_from(path, cgroup)
            pinning.unpin(path)
        self._attached_file.unlink(missing_ok=True)
