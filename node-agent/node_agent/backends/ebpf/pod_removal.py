"""Taking a pod's eBPF part off: its programs off its cgroup, our TC filters out of its netns, its entries
out of the node maps, its pin directory; and the proxy cgroup's programs once no pod is left (a little
later: `ProxyOrigDst.release`)."""

from __future__ import annotations

import logging
from pathlib import Path

from node_agent.backends.base import BackendError, PodTarget
from node_agent.backends.ebpf import bpfsys, cgroup_programs, loader, pinning, pod_index, pod_state, tc, tc_attach
from node_agent.backends.ebpf.attach import Cgroup, CgroupError
from node_agent.backends.ebpf.proxy_orig_dst import ProxyOrigDst

log = logging.getLogger("headrace.backend.ebpf")


def remove_pod(root: Path, pdir: Path, target: PodTarget, orig_dst: ProxyOrigDst, proxy_cgroup: str | None,
               keep_proxy: bool = False) -> None:
    """pdir: the pod's pin directory under the bpffs root. The cgroup is target.cgroup_path, or (None) the one
    its pinned config names. keep_proxy: the proxy cgroup's programs stay even when no pod is left (the pod
    is applied again right after). BackendError when the kernel refuses a step."""
    cg = pod_state.cgroup_of(target.cgroup_path, pdir)
    try:
        if cg is not None:
            with Cgroup(cg) as c:
                if pdir.is_dir():
                    for child in list(pdir.iterdir()):
                        if child.name in loader.PROGRAMS:
                            cgroup_programs.detach_pinned(c, child)
                cgroup_programs.detach_ours_by_name(c)
        if target.netns_path:  # our filters only; cheap when there are none
            try:
                tc_attach.detach(target.netns_path)
            except (tc.TcError, OSError) as e:  # netns gone or not a netns any more: filters went with it
                log.info("ebpf tc detach skipped", extra={"pod": target.uid, "reason": str(e)})
        pod_index.drop_pod(root / pinning.NODE_DIR, pdir)
        pinning.remove_dir(pdir)
        if not keep_proxy and not pinning.any_pod_dir(root):  # the node maps stay (the backend's close() takes them)
            orig_dst.release(proxy_cgroup, root)
    except (bpfsys.BpfSysError, CgroupError, OSError, tc.TcError) as e:
        raise BackendError(f"eBPF remove for pod {target.uid} failed: {e}") from e
    log.info("ebpf redirect removed", extra={"pod": target.uid, "event": "ebpf_removed"})
