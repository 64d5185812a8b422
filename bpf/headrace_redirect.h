/* headrace eBPF redirection: shared types of the programs in redirect.c and of the Python loader
 * (node_agent.backends.ebpf.maps packs these layouts; keep both in step).
 *
 * UAPI headers only (no vmlinux.h). Every parameter (ports, uid, mark, mode, excluded ports and ranges)
 * arrives through the per-pod maps below; the C never needs editing for a different pod or spec.
 */
#ifndef HEADRACE_REDIRECT_H
#define HEADRACE_REDIRECT_H

#define HR_MODE_SIDECAR 1
#define HR_MODE_AMBIENT 2

#define HR_SO_ORIGINAL_DST 80 /* SOL_IP / SO_ORIGINAL_DST and SOL_IPV6 / IP6T_SO_ORIGINAL_DST */
#define HR_SOL_IP 0
#define HR_SOL_IPV6 41
#define HR_AF_INET 2
#define HR_AF_INET6 10
#define HR_SOCK_STREAM 1
#define HR_SOCK_DGRAM 2
#define HR_DNS_PORT 53

#define HR_FAM_V4 1
#define HR_FAM_V6 2

#define HR_INBOUND_NONE 0    /* no inbound capture */
#define HR_INBOUND_ALL 1     /* every TCP port except those in hr_cfg_xin */
#define HR_INBOUND_LISTED 2  /* only the ports in hr_cfg_iin (minus hr_cfg_xin) */

/* per-pod parameters: array map "hr_cfg", one entry (index 0). 104 bytes. */
struct hr_config {
    __u32 mode;          /* HR_MODE_* */
    __u32 proxy_uid;     /* sidecar: connections of this uid are never redirected */
    __u32 mark;          /* ambient: sockets with (mark & mark_mask) == mark are never redirected */
    __u32 mark_mask;
    __u16 outbound_port; /* TCP redirect target on loopback */
    __u16 dns_port;      /* UDP 53 redirect target on loopback (when capture_dns) */
    __u8 capture_dns;
    __u8 include_all4;   /* 1: every IPv4 destination is captured unless excluded */
    __u8 include_all6;
    __u8 inbound_mode;   /* HR_INBOUND_* */
    __u64 generation;    /* hash of the applied spec: lets the agent see what is installed */
    __u64 cgroup_id;     /* the cgroup the programs are attached to (for removal after a restart) */
    __u16 inbound_port;  /* inbound TCP is rewritten to this port (TC ingress/egress) */
    __u16 families;      /* HR_FAM_* bits: the address families the pod has (as iptables installs rules per
                          * family); 0 = both (the pod's IPs are not known) */
    __u32 probe_src4;    /* inbound from this source (kubelet probe SNAT) is not captured; 0 = none */
    __u32 probe_src6[4]; /* same for IPv6; all zero = none */
    __u32 proxy_gid;     /* sidecar: connections of this gid are never redirected (as the uid) */
    /* the pod netns' cookie (SO_NETNS_COOKIE, read by the agent) in two halves (keeps the layout at 96
     * bytes): TC programs key the node's flow maps with it, since bpf_get_netns_cookie(skb) in TC answers
     * for the skb's socket, which on ingress is none or the sender's */
    __u32 netns_cookie_lo;
    /* the pod's own first IPv4 / IPv6 address (network order; zero = the pod has none of that family):
     * redirected sockets are bound to it first (bpf_bind / the sendmsg source), so the proxy sees the pod
     * IP as the peer, as with iptables REDIRECT; no binding when zero */
    __u32 self_ip4;
    __u32 self_ip6[4];
    __u32 netns_cookie_hi;
    /* sidecar: the proxy's HBONE port (15008): the proxy's own connections to its pod's IP on it are not
     * sent to inbound_port (istio-iptables: "! --dport 15008" on that rule); 0 = none */
    __u16 hbone_port;
    __u16 tc_slot; /* the classid of the pod's TC filters, its key in hr_pod_tc; 0 = its own TC programs */
    __u32 netns_ino;     /* the pod netns' inode number: the agent's check that the pod kept its netns */
};

/* a pod's sets in the node maps: the pod netns' cookie and its config's generation */
struct hr_set_key {
    __u64 netns;
    __u64 generation; /* hr_config.generation of the config the sets belong to */
};

/* the kinds of sets (hr_port_key.kind, hr_net_key.data[4]) */
#define HR_SET_XPORTS 1 /* excluded outbound ports */
#define HR_SET_OPORTS 2 /* included outbound ports */
#define HR_SET_XIN 3    /* excluded inbound ports */
#define HR_SET_IIN 4    /* included inbound ports (HR_INBOUND_LISTED) */
#define HR_SET_XNETS 1  /* excluded outbound ranges */
#define HR_SET_INETS 2  /* included outbound ranges */
#define HR_SET_LOCAL 3  /* the pod's own addresses (/128 each) */

/* hash key of hr_pod_ports. 24 bytes. */
struct hr_port_key {
    __u64 netns;
    __u64 generation;
    __u16 port; /* host order */
    __u16 kind;
    __u32 pad;
};

/* LPM trie key of hr_pod_nets: data = netns cookie (8 bytes, native order), generation (8), kind (4), then
 * the address as in hr_lpm_key; prefixlen = HR_NET_KEY_BITS + the range's length in hr_lpm_key. 40 bytes. */
#define HR_NET_KEY_BITS 160
struct hr_net_key {
    __u32 prefixlen;
    __u32 data[9];
};

/* LPM trie key of the include/exclude range maps (IPv4 ranges stored as ::ffff:a.b.c.d/96+len) */
struct hr_lpm_key {
    __u32 prefixlen;
    __u32 addr[4];
};

/* an original destination; addresses always 16 bytes (IPv4 as ::ffff:a.b.c.d) */
struct hr_orig {
    __u32 addr[4];
    __u16 port; /* network byte order */
    __u16 family; /* HR_AF_INET or HR_AF_INET6: what the app asked for */
};

/* hr_nat values: set in hr_orig.family once the flow's accepted socket holds the state (hr_in_orig) */
#define HR_NAT_SAVED 0x100

/* a redirected connection as both ends see it: the client's address and port in one netns */
struct hr_conn_key {
    __u64 netns;
    __u32 addr[4]; /* client address, IPv4 as ::ffff:a.b.c.d */
    __u32 port;    /* client port, host byte order */
};

/* a connection by its handshake, as both ends see it whatever NAT did to its ports: the netns and the
 * next sequence numbers of each direction once it is established (initial sequence number + 1) */
struct hr_seq_key {
    __u64 netns;
    __u32 client; /* the client's snd_nxt, the server's rcv_nxt */
    __u32 server; /* the server's snd_nxt, the client's rcv_nxt */
};

#endif
