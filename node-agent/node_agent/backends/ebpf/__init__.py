"""The eBPF redirection backend (bcc-compiled programs in bpf/, attached to each pod's own cgroup v2).

Modules: bpfsys (bpf(2) via ctypes), loader (compile once; object_cache keeps the object on disk), maps
(pure spec -> map entries), pod_cgroup (a pod's kubelet cgroup from its uid), tc_status (our TC filters, raw
netlink),
cgroup_programs (our programs on a cgroup: which, find, detach, roll back), proxy_orig_dst (the node-level
getsockopt program on the proxy cgroup),
pinning (bpffs at <state-dir>/bpf), attach (cgroup v2 attach), tc (clsact ingress in the pod netns),
backend (EbpfBackend), probe (can it run?). See docs/ebpf.md.
Import EbpfBackend from node_agent.backends.ebpf.backend; this package imports nothing heavy.
"""
