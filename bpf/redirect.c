/* headrace eBPF redirection programs (compiled once per node by bcc; see below for how they are loaded).
 *
 * Attached to each pod's own cgroup v2 directory (BPF_F_ALLOW_MULTI), never host-wide:
 *   hr_connect4 / hr_connect6   cgroup/connect4|6: outbound TCP -> loopback:outbound_port with the socket
 *                               bound to the pod IP first (the source iptables REDIRECT keeps), original
 *                               destination remembered by socket cookie; TCP/UDP :53 -> loopback:dns_port.
 *                               Compiled once per pod mode (hr_connect4_sc / _amb, ...: the mode is a
 *                               constant, so the verifier walks one mode's paths, a quarter of the states)
 *                               and attached under these names
 *   hr_sockops                  sock_ops: at TCP connect, move the original destination from the socket
 *                               cookie to the connection's client address/port (what the proxy sees;
 *                               also keyed by handshake for a while, for a client port conntrack changed)
 *   hr_getsockopt               cgroup/getsockopt: answers SO_ORIGINAL_DST (SOL_IP 80, SOL_IPV6 80) for
 *                               redirected connections from that map, as netfilter would after REDIRECT
 *   hr_sock_create              cgroup/sock_create (sidecar): the creator's uid/gid of each TCP socket
 *   hr_getpeername4|6           a redirected socket's peer name is the destination the app asked (TCP, DNS)
 *   hr_sendmsg4|6, hr_recvmsg4|6   DNS capture (unconnected sends from the pod IP, replies' source); ambient
 *                               pods only
 * and inside the pod's netns only:
 *   hr_tc_ingress / hr_tc_egress   TC (clsact) on the pod's interfaces (the _node variants: see below): a
 *                               new inbound TCP connection to a captured port is rewritten to the proxy's
 *                               inbound port (destination port on ingress, source port of the replies on
 *                               egress: REDIRECT without conntrack, per-flow state in hr_nat);
 *                               SO_ORIGINAL_DST answered from hr_conn_orig
 *
 * The cgroup programs are loaded once per node (per pod mode) and attached to every pod's cgroup: they read
 * the pod's parameters from the node's hr_pod_cfg, hr_pod_ports and hr_pod_nets, keyed by the socket's netns
 * cookie (and, for the sets, the config's generation, so that a new spec's sets go in beside the old ones
 * and the config switches to them in one write). So do the TC programs (hr_tc_ingress_node /
 * hr_tc_egress_node, loaded once per node): each pod's TC filters carry its TC slot as their classid, and
 * hr_pod_tc maps the slot to the pod's netns cookie; a pod that gets no slot (all 65535 taken) gets its own
 * hr_tc_ingress / hr_tc_egress, which read the pod's own hr_cfg_* maps. Those maps are the pod's own copy
 * of its parameters: the agent's record of what it put in the node maps. hr_conn_orig,
 * hr_cookie_orig and hr_dns_orig are shared by all pods of a node (keyed by socket cookie / netns cookie +
 * client address) so that a proxy in another cgroup can be answered too. UAPI headers only.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include "headrace_redirect.h"

BPF_ARRAY(hr_cfg, struct hr_config, 1);
/* the sets (ports in host order): not preallocated (a pod's sets hold a few entries; the maps are made for
 * every pod) */
BPF_F_TABLE("hash", u16, u8, hr_cfg_xports, 1024, BPF_F_NO_PREALLOC); /* excluded outbound ports */
BPF_LPM_TRIE(hr_cfg_xnets, struct hr_lpm_key, u8, 1024); /* excluded outbound ranges */
BPF_LPM_TRIE(hr_cfg_inets, struct hr_lpm_key, u8, 1024); /* included outbound ranges (when not all) */
BPF_F_TABLE("hash", u16, u8, hr_cfg_xin, 1024, BPF_F_NO_PREALLOC); /* excluded inbound ports */
BPF_F_TABLE("hash", u16, u8, hr_cfg_iin, 1024, BPF_F_NO_PREALLOC); /* included inbound ports (HR_INBOUND_LISTED) */
BPF_LPM_TRIE(hr_cfg_local, struct hr_lpm_key, u8, 64); /* the pod's own addresses (/128 each) */
/* included outbound ports: captured whatever the address */
BPF_F_TABLE("hash", u16, u8, hr_cfg_oports, 1024, BPF_F_NO_PREALLOC);
/* every pod's parameters, for the node's cgroup programs (not maps of maps: a write to one of those from
 * user space waits for an RCU grace period, ~8 ms here): the config by netns cookie, the sets by (netns
 * cookie, generation, set) */
BPF_F_TABLE("hash", u64, struct hr_config, hr_pod_cfg, 16384, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct hr_port_key, u8, hr_pod_ports, 65536, BPF_F_NO_PREALLOC);
BPF_LPM_TRIE(hr_pod_nets, struct hr_net_key, u8, 65536);
/* the node's TC programs: a pod's TC slot (its filters' classid) -> its netns cookie */
BPF_F_TABLE("hash", u32, u64, hr_pod_tc, 65536, BPF_F_NO_PREALLOC);
BPF_TABLE("lru_hash", u64, struct hr_orig, hr_cookie_orig, 65536);
BPF_TABLE("lru_hash", struct hr_conn_key, struct hr_orig, hr_conn_orig, 65536);
/* the same, by handshake, from the client's side being established until the proxy's: the proxy finds its
 * connection there when conntrack gave it another source port than the client socket's (the reply tuple
 * clashed with a lingering entry, e.g. of a connection iptables REDIRECTed before the pod moved to eBPF) */
BPF_TABLE("lru_hash", struct hr_seq_key, struct hr_orig, hr_seq_orig, 16384);
BPF_TABLE("lru_hash", u64, struct hr_orig, hr_dns_orig, 65536);
/* inbound port rewrite state (TC): client (netns, address, port) -> the address and port it dialled */
BPF_TABLE("lru_hash", struct hr_conn_key, struct hr_orig, hr_nat, 65536);
/* inbound, per socket: the original destination of a redirected inbound connection, stored on the accepted
 * socket itself (freed with it), so an established flow never depends on hr_nat, which an LRU can evict
 * while the connection idles; hr_nat then only carries the handshake and the tail of a connection */
BPF_SK_STORAGE(hr_in_orig, struct hr_orig);
/* sidecar: uid (low 32 bits) and gid of the process that created a TCP socket, by socket cookie */
BPF_TABLE("lru_hash", u64, u64, hr_sock_owner, 65536);

/* The calling socket's pod config (hr_pod_cfg by the netns cookie; NULL: not a pod of ours) and the key of
 * its sets. */
static __always_inline struct hr_config *hr_pod_config(void *ctx, struct hr_set_key *sets)
{
    u64 netns = bpf_get_netns_cookie(ctx);
    struct hr_config *cfg = hr_pod_cfg.lookup(&netns);
    if (!cfg)
        return NULL;
    sets->netns = netns;
    sets->generation = cfg->generation;
    return cfg;
}

/* 1 when the port is in the pod's set of that kind (HR_SET_*) */
static __always_inline int hr_port_in(struct hr_set_key *sets, u16 kind, u16 port)
{
    struct hr_port_key key = {};
    key.netns = sets->netns;
    key.generation = sets->generation;
    key.port = port;
    key.kind = kind;
    return hr_pod_ports.lookup(&key) != NULL;
}

/* 1 when the address (16-byte form) is in a range of the pod's set of that kind (HR_SET_*) */
static __always_inline int hr_addr_in(struct hr_set_key *sets, u32 kind, u32 *addr)
{
    struct hr_net_key key = {};
    key.prefixlen = HR_NET_KEY_BITS + 128;
    __builtin_memcpy(&key.data[0], &sets->netns, 8);
    __builtin_memcpy(&key.data[2], &sets->generation, 8);
    key.data[4] = kind;
    key.data[5] = addr[0];
    key.data[6] = addr[1];
    key.data[7] = addr[2];
    key.data[8] = addr[3];
    return hr_pod_nets.lookup(&key) != NULL;
}

/* 1 when the destination (16-byte form) must not be captured */
static __always_inline int hr_dest_excluded(struct hr_config *cfg, struct hr_set_key *sets, u32 *addr, u16 port,
                                            int v4)
{
    if (hr_port_in(sets, HR_SET_XPORTS, port))
        return 1;
    if (hr_addr_in(sets, HR_SET_XNETS, addr))
        return 1;
    if (hr_port_in(sets, HR_SET_OPORTS, port)) /* includeOutboundPorts: after the exclusions, before ranges */
        return 0;
    if (v4 ? cfg->include_all4 : cfg->include_all6)
        return 0;
    if (hr_addr_in(sets, HR_SET_INETS, addr))
        return 0;
    return 1;
}

static __always_inline int hr_is_loopback(u32 *addr, int v4)
{
    if (v4)
        return (bpf_ntohl(addr[3]) >> 24) == 127;
    return addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == bpf_htonl(1);
}

/* 127.0.0.1 or ::1 exactly (iptables: -d 127.0.0.1/32, -d ::1/128) */
static __always_inline int hr_is_lo_primary(u32 *addr, int v4)
{
    if (v4)
        return addr[3] == bpf_htonl(0x7f000001);
    return addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == bpf_htonl(1);
}

/* a destination routed over lo: loopback or one of the pod's own addresses (HR_SET_LOCAL) */
static __always_inline int hr_is_local(struct hr_set_key *sets, u32 *addr, int v4)
{
    if (hr_is_loopback(addr, v4))
        return 1;
    return hr_addr_in(sets, HR_SET_LOCAL, addr);
}

/* whether the pod has this address family (a v4-mapped destination is IPv4 on the wire) */
static __always_inline int hr_family_wanted(struct hr_config *cfg, int v4)
{
    u16 fam = cfg->families;
    return fam == 0 || (fam & (v4 ? HR_FAM_V4 : HR_FAM_V6)) != 0;
}

/* the kubelet probe SNAT address of the spec (ambient; zero = none) */
static __always_inline int hr_is_probe_src(struct hr_config *cfg, u32 *addr, int v4)
{
    if (v4)
        return cfg->probe_src4 != 0 && addr[3] == cfg->probe_src4;
    u32 p0 = cfg->probe_src6[0];
    u32 p1 = cfg->probe_src6[1];
    u32 p2 = cfg->probe_src6[2];
    u32 p3 = cfg->probe_src6[3];
    return (p0 | p1 | p2 | p3) != 0 && addr[0] == p0 && addr[1] == p1 && addr[2] == p2 && addr[3] == p3;
}

#define HR_TO_OUTBOUND 1
#define HR_TO_INBOUND 2
#define HR_TO_DNS 3

/* sidecar: a constant at every call (1: the sidecar's rules, 0: ambient's); a pod's cgroup only ever has
 * the programs of its own mode attached, so a config of the other mode (never seen) is let by */
static __always_inline int hr_connect(struct bpf_sock_addr *ctx, u32 *addr, int v4, int mapped, int sendmsg,
                                      int sidecar)
{
    struct hr_set_key sets = {};
    struct hr_config *cfg = hr_pod_config(ctx, &sets);
    if (!cfg || cfg->mode != (sidecar ? HR_MODE_SIDECAR : HR_MODE_AMBIENT))
        return 1;
    u16 port = bpf_ntohs((u16)ctx->user_port);
    u32 type = ctx->type;
    if (type != HR_SOCK_STREAM && type != HR_SOCK_DGRAM)
        return 1;
    if (!hr_family_wanted(cfg, v4))
        return 1;
    if (type == HR_SOCK_DGRAM && (!cfg->capture_dns || port != HR_DNS_PORT))
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    /* read the socket fields once, unconditionally (verifier: no offset socket pointers) */
    u32 mark = sk->mark;
    u32 family = sk->family;
    u32 s4 = sk->src_ip4;
    u32 s6_0 = sk->src_ip6[0];
    u32 s6_1 = sk->src_ip6[1];
    u32 s6_2 = sk->src_ip6[2];
    u32 s6_3 = sk->src_ip6[3];
    int local = hr_is_local(&sets, addr, v4);
    int to = HR_TO_OUTBOUND;

    if (sidecar) {
        /* iptables' owner match tests the socket's creator (its file credentials), not the caller of
         * connect(): use the creator recorded by hr_sock_create; the caller for a socket made before it */
        u64 sock_cookie = bpf_get_socket_cookie(ctx);
        u64 *owner = hr_sock_owner.lookup(&sock_cookie);
        u64 ugid = owner ? *owner : bpf_get_current_uid_gid();
        int proxy = (u32)ugid == cfg->proxy_uid || (u32)(ugid >> 32) == cfg->proxy_gid;
        /* Envoy's inbound passthrough source 127.0.0.6 / ::6 over lo: never touched */
        int passthrough = family == HR_AF_INET ? s4 == bpf_htonl(0x7f000006)
                        : (s6_0 == 0 && s6_1 == 0 && ((s6_2 == 0 && s6_3 == bpf_htonl(6)) ||
                           (s6_2 == bpf_htonl(0xffff) && s6_3 == bpf_htonl(0x7f000006))));
        if (local && passthrough)
            return 1;
        if (proxy) {
            /* the proxy dialling the pod itself (not 127.0.0.1): goes through inbound, as with iptables,
             * except to its own HBONE port */
            if (type == HR_SOCK_STREAM && local && !hr_is_lo_primary(addr, v4) && port != cfg->hbone_port)
                to = HR_TO_INBOUND;
            else
                return 1;
        } else if (local) {
            return 1;
        }
    } else {
        if ((mark & cfg->mark_mask) == cfg->mark)
            return 1;
        if (local)
            return 1;
        /* TCP to the kubelet probe SNAT address is never captured (iptables: -d <probe> -p tcp -j ACCEPT) */
        if (type == HR_SOCK_STREAM && hr_is_probe_src(cfg, addr, v4))
            return 1;
        if (cfg->capture_dns && port == HR_DNS_PORT)
            to = HR_TO_DNS; /* UDP and TCP 53 */
        else if (type != HR_SOCK_STREAM)
            return 1;
    }
    if (to == HR_TO_OUTBOUND && hr_dest_excluded(cfg, &sets, addr, port, v4))
        return 1;

    struct hr_orig orig = {};
    orig.addr[0] = addr[0];
    orig.addr[1] = addr[1];
    orig.addr[2] = addr[2];
    orig.addr[3] = addr[3];
    orig.port = bpf_htons(port);
    orig.family = v4 && !mapped ? HR_AF_INET : HR_AF_INET6;
    u64 cookie = bpf_get_socket_cookie(ctx);
    if (type == HR_SOCK_DGRAM)
        hr_dns_orig.update(&cookie, &orig);
    else
        hr_cookie_orig.update(&cookie, &orig);

    u16 dport = to == HR_TO_DNS ? cfg->dns_port : to == HR_TO_INBOUND ? cfg->inbound_port : cfg->outbound_port;
    ctx->user_port = bpf_htons(dport);

    /* As iptables REDIRECT in OUTPUT: the new destination is 127.0.0.1 / ::1 (::ffff:127.0.0.1 on a
     * dual-stack socket) and the source stays the one the kernel would have picked for the original
     * destination, so the proxy sees peer = pod IP and local = loopback:port. A sock_addr program cannot
     * set the source of a connect, so it binds the socket first (bpf_bind, address only: the port is still
     * chosen at connect); sendmsg sets the message source instead. The source:
     *   outbound, DNS   the pod's first IP of the family (hr_config.self_ip4/6), as routing over the pod's
     *                   interface picks it;
     *   inbound (proxy dialling its own pod IP)   that address itself (a local route's source);
     *   a socket already bound to an address, or a pod with no IP of the family: left as it is. */
    u32 src[4] = {};
    int want_src = 0;
    if (to == HR_TO_INBOUND) {
        if (!hr_is_loopback(addr, v4)) {
            src[0] = addr[0];
            src[1] = addr[1];
            src[2] = addr[2];
            src[3] = addr[3];
            want_src = 1;
        }
    } else if (v4) {
        u32 self4 = cfg->self_ip4;
        if (self4) {
            src[2] = bpf_htonl(0xffff);
            src[3] = self4;
            want_src = 1;
        }
    } else {
        src[0] = cfg->self_ip6[0];
        src[1] = cfg->self_ip6[1];
        src[2] = cfg->self_ip6[2];
        src[3] = cfg->self_ip6[3];
        want_src = (src[0] | src[1] | src[2] | src[3]) != 0;
    }
    int unbound = family == HR_AF_INET ? s4 == 0 : (s6_0 | s6_1 | s6_2 | s6_3) == 0;
    int to_lo = 1;
    if (want_src && unbound) {
        if (sendmsg == 4) { /* msg_src_* exist only in the sendmsg programs: sendmsg is a constant */
            if (v4 && !mapped) {
                if (ctx->msg_src_ip4 == 0)
                    ctx->msg_src_ip4 = src[3];
            }
        } else if (sendmsg == 6) {
            if (!v4) {
                u32 m0 = ctx->msg_src_ip6[0];
                u32 m1 = ctx->msg_src_ip6[1];
                u32 m2 = ctx->msg_src_ip6[2];
                u32 m3 = ctx->msg_src_ip6[3];
                if ((m0 | m1 | m2 | m3) == 0) {
                    ctx->msg_src_ip6[0] = src[0];
                    ctx->msg_src_ip6[1] = src[1];
                    ctx->msg_src_ip6[2] = src[2];
                    ctx->msg_src_ip6[3] = src[3];
                }
            }
        } else {
            long err;
            if (v4 && !mapped) {
                struct sockaddr_in sa = {};
                sa.sin_family = HR_AF_INET;
                sa.sin_addr.s_addr = src[3];
                err = bpf_bind(ctx, &sa, sizeof(sa));
            } else {
                struct sockaddr_in6 sa6 = {};
                sa6.sin6_family = HR_AF_INET6;
                sa6.sin6_addr.in6_u.u6_addr32[0] = src[0];
                sa6.sin6_addr.in6_u.u6_addr32[1] = src[1];
                sa6.sin6_addr.in6_u.u6_addr32[2] = src[2];
                sa6.sin6_addr.in6_u.u6_addr32[3] = src[3];
                err = bpf_bind(ctx, &sa6, sizeof(sa6));
            }
            /* not bindable (a port already bound on the wildcard, an address not ready): send TCP to the
             * source address itself instead, which makes the kernel pick it as the source (the proxy then
             * sees it as the local address too); DNS stays on loopback for a DNS proxy bound there */
            if (err && to != HR_TO_DNS)
                to_lo = 0;
        }
    }
    if (v4) {
        u32 dst4 = to_lo ? bpf_htonl(0x7f000001) : src[3];
        if (!mapped) {
            ctx->user_ip4 = dst4;
        } else {
            ctx->user_ip6[0] = 0;
            ctx->user_ip6[1] = 0;
            ctx->user_ip6[2] = bpf_htonl(0xffff);
            ctx->user_ip6[3] = dst4;
        }
    } else if (!to_lo) {
        ctx->user_ip6[0] = src[0];
        ctx->user_ip6[1] = src[1];
        ctx->user_ip6[2] = src[2];
        ctx->user_ip6[3] = src[3];
    } else {
        ctx->user_ip6[0] = 0;
        ctx->user_ip6[1] = 0;
        ctx->user_ip6[2] = 0;
        ctx->user_ip6[3] = bpf_htonl(1);
    }
    return 1;
}

/* cgroup/sock_create: remember who created each TCP socket of a sidecar pod (the proxy bypass tests it) */
int hr_sock_create(struct bpf_sock *sk)
{
    struct hr_set_key sets = {};
    struct hr_config *cfg = hr_pod_config(sk, &sets);
    if (!cfg || cfg->mode != HR_MODE_SIDECAR)
        return 1;
    if (sk->type != HR_SOCK_STREAM)
        return 1;
    u64 cookie = bpf_get_socket_cookie(sk);
    u64 ugid = bpf_get_current_uid_gid();
    hr_sock_owner.update(&cookie, &ugid);
    return 1;
}

/* The destination of an AF_INET6 sock_addr call; returns whether it is a v4-mapped address. */
static __always_inline int hr_user_addr6(struct bpf_sock_addr *ctx, u32 addr[4])
{
    addr[0] = ctx->user_ip6[0];
    addr[1] = ctx->user_ip6[1];
    addr[2] = ctx->user_ip6[2];
    addr[3] = ctx->user_ip6[3];
    return addr[0] == 0 && addr[1] == 0 && addr[2] == bpf_htonl(0xffff);
}

static __always_inline int hr_connect_v4(struct bpf_sock_addr *ctx, int sidecar)
{
    u32 addr[4] = {0, 0, bpf_htonl(0xffff), ctx->user_ip4};
    return hr_connect(ctx, addr, 1, 0, 0, sidecar);
}

static __always_inline int hr_connect_v6(struct bpf_sock_addr *ctx, int sidecar)
{
    u32 addr[4];
    int mapped = hr_user_addr6(ctx, addr);
    return hr_connect(ctx, addr, mapped, mapped, 0, sidecar);
}

int hr_connect4_sc(struct bpf_sock_addr *ctx)
{
    return hr_connect_v4(ctx, 1);
}

int hr_connect4_amb(struct bpf_sock_addr *ctx)
{
    return hr_connect_v4(ctx, 0);
}

int hr_connect6_sc(struct bpf_sock_addr *ctx)
{
    return hr_connect_v6(ctx, 1);
}

int hr_connect6_amb(struct bpf_sock_addr *ctx)
{
    return hr_connect_v6(ctx, 0);
}

/* a key's address from a socket's, read off its ctx by the caller (the verifier wants plain ctx loads):
 * IPv4 as v4-mapped, IPv6 as it is */
static __always_inline void hr_key_addr(struct hr_conn_key *key, int v4, u32 ip4, u32 a0, u32 a1, u32 a2, u32 a3)
{
    if (v4) {
        key->addr[2] = bpf_htonl(0xffff);
        key->addr[3] = ip4;
    } else {
        key->addr[0] = a0;
        key->addr[1] = a1;
        key->addr[2] = a2;
        key->addr[3] = a3;
    }
}

static __always_inline void hr_conn_key_of_ops(struct bpf_sock_ops *skops, struct hr_conn_key *key)
{
    /* read every field unconditionally: the verifier rejects a ctx pointer the compiler offset */
    u32 family = skops->family;
    u32 ip4 = skops->local_ip4;
    u32 a0 = skops->local_ip6[0];
    u32 a1 = skops->local_ip6[1];
    u32 a2 = skops->local_ip6[2];
    u32 a3 = skops->local_ip6[3];
    key->netns = bpf_get_netns_cookie(skops);
    key->port = skops->local_port;
    hr_key_addr(key, family == HR_AF_INET, ip4, a0, a1, a2, a3);
}

/* the key of an accepted (inbound) connection: the remote end is the client */
static __always_inline void hr_conn_key_of_peer(struct bpf_sock_ops *skops, struct hr_conn_key *key)
{
    u32 family = skops->family;
    u32 ip4 = skops->remote_ip4;
    u32 a0 = skops->remote_ip6[0];
    u32 a1 = skops->remote_ip6[1];
    u32 a2 = skops->remote_ip6[2];
    u32 a3 = skops->remote_ip6[3];
    u32 rport = skops->remote_port;
    key->netns = bpf_get_netns_cookie(skops);
    /* network order in the upper 16 bits on little endian kernels; accept both layouts */
    key->port = (rport & 0xffff) == 0 ? bpf_ntohl(rport) : bpf_ntohs((u16)rport);
    hr_key_addr(key, family == HR_AF_INET, ip4, a0, a1, a2, a3);
}

/* an inbound connection the proxy (in this cgroup) just accepted: keep its rewrite state on the socket */
static __always_inline void hr_in_orig_from_nat(struct bpf_sock_ops *skops, struct hr_conn_key *key)
{
    struct hr_orig *nat = hr_nat.lookup(key);
    if (!nat)
        return;
    struct hr_orig copy = *nat;
    copy.family &= ~HR_NAT_SAVED;
    struct bpf_sock *sk = skops->sk;
    if (sk && hr_in_orig.sk_storage_get(sk, &copy, BPF_SK_STORAGE_GET_F_CREATE))
        nat->family |= HR_NAT_SAVED;
}

int hr_sockops(struct bpf_sock_ops *skops)
{
    struct hr_conn_key key = {};
    u32 op = skops->op;
    if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
        u64 cookie = bpf_get_socket_cookie(skops);
        struct hr_orig *orig = hr_cookie_orig.lookup(&cookie);
        if (!orig)
            return 1;
        struct hr_orig copy = *orig;
        hr_conn_key_of_ops(skops, &key);
        hr_conn_orig.update(&key, &copy);
        hr_cookie_orig.delete(&cookie);
        bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
    } else if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        hr_conn_key_of_ops(skops, &key);
        struct hr_orig *orig = hr_conn_orig.lookup(&key);
        if (!orig)
            return 1;
        struct hr_orig copy = *orig;
        struct hr_seq_key seq = {.netns = key.netns, .client = skops->snd_nxt, .server = skops->rcv_nxt};
        hr_seq_orig.update(&seq, &copy);
    } else if (op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
        hr_conn_key_of_peer(skops, &key);
        struct hr_seq_key seq = {.netns = key.netns, .client = skops->rcv_nxt, .server = skops->snd_nxt};
        struct hr_orig *by_seq = hr_seq_orig.lookup(&seq);
        if (by_seq) {
            /* under the client's port as this end sees it (another one after such a clash) */
            struct hr_orig copy = *by_seq;
            hr_conn_orig.update(&key, &copy);
            hr_seq_orig.delete(&seq);
        }
        if (hr_conn_orig.lookup(&key))
            bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
        hr_in_orig_from_nat(skops, &key);
    } else if (op == BPF_SOCK_OPS_STATE_CB) {
        if (skops->args[1] == BPF_TCP_CLOSE) {
            hr_conn_key_of_ops(skops, &key);
            hr_conn_orig.delete(&key);
            struct hr_conn_key peer = {};
            hr_conn_key_of_peer(skops, &peer);
            hr_conn_orig.delete(&peer);
        }
    }
    return 1;
}

int hr_getsockopt(struct bpf_sockopt *ctx)
{
    if (ctx->optname != HR_SO_ORIGINAL_DST)
        return 1;
    if (ctx->level != HR_SOL_IP && ctx->level != HR_SOL_IPV6)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    struct hr_conn_key key = {};
    key.netns = bpf_get_netns_cookie(ctx);
    key.port = bpf_ntohs((u16)sk->dst_port);
    u32 family = sk->family;
    u32 ip4 = sk->dst_ip4;
    u32 a0 = sk->dst_ip6[0];
    u32 a1 = sk->dst_ip6[1];
    u32 a2 = sk->dst_ip6[2];
    u32 a3 = sk->dst_ip6[3];
    if (family != HR_AF_INET && family != HR_AF_INET6)
        return 1;
    hr_key_addr(&key, family == HR_AF_INET, ip4, a0, a1, a2, a3);
    struct hr_orig *orig = hr_conn_orig.lookup(&key);
    if (!orig)
        return 1;
    void *optval = ctx->optval;
    void *end = ctx->optval_end;
    if (ctx->level == HR_SOL_IP) {
        if (orig->family != HR_AF_INET && orig->addr[2] != bpf_htonl(0xffff))
            return 1;
        struct sockaddr_in *sin = optval;
        if ((void *)(sin + 1) > end)
            return 1;
        __builtin_memset(sin, 0, sizeof(*sin));
        sin->sin_family = HR_AF_INET;
        sin->sin_port = orig->port;
        sin->sin_addr.s_addr = orig->addr[3];
        ctx->optlen = sizeof(*sin);
    } else {
        struct sockaddr_in6 *sin6 = optval;
        if ((void *)(sin6 + 1) > end)
            return 1;
        __builtin_memset(sin6, 0, sizeof(*sin6));
        sin6->sin6_family = HR_AF_INET6;
        sin6->sin6_port = orig->port;
        sin6->sin6_addr.in6_u.u6_addr32[0] = orig->addr[0];
        sin6->sin6_addr.in6_u.u6_addr32[1] = orig->addr[1];
        sin6->sin6_addr.in6_u.u6_addr32[2] = orig->addr[2];
        sin6->sin6_addr.in6_u.u6_addr32[3] = orig->addr[3];
        ctx->optlen = sizeof(*sin6);
    }
    ctx->retval = 0;
    return 1;
}

/* DNS: unconnected sends to :53 go to the local DNS proxy; replies appear to come from the server asked */
static __always_inline int hr_sendmsg(struct bpf_sock_addr *ctx, u32 *addr, int v4, int mapped, int which)
{
    if (ctx->type != HR_SOCK_DGRAM)
        return 1;
    return hr_connect(ctx, addr, v4, mapped, which, 0);
}

int hr_sendmsg4(struct bpf_sock_addr *ctx)
{
    u32 addr[4] = {0, 0, bpf_htonl(0xffff), ctx->user_ip4};
    return hr_sendmsg(ctx, addr, 1, 0, 4);
}

int hr_sendmsg6(struct bpf_sock_addr *ctx)
{
    u32 addr[4];
    int mapped = hr_user_addr6(ctx, addr);
    return hr_sendmsg(ctx, addr, mapped, mapped, 6);
}

/* The original destination of a redirected TCP connection, looked up by the client socket's own address:
 * getpeername() on it answers the server the app dialled, as with iptables (conntrack NAT leaves the
 * socket's peer alone). */
static __always_inline struct hr_orig *hr_tcp_orig_of(struct bpf_sock_addr *ctx)
{
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return NULL;
    u32 family = sk->family;
    u32 ip4 = sk->src_ip4;
    u32 a0 = sk->src_ip6[0];
    u32 a1 = sk->src_ip6[1];
    u32 a2 = sk->src_ip6[2];
    u32 a3 = sk->src_ip6[3];
    struct hr_conn_key key = {};
    key.netns = bpf_get_netns_cookie(ctx);
    key.port = sk->src_port;
    hr_key_addr(&key, family == HR_AF_INET, ip4, a0, a1, a2, a3);
    return hr_conn_orig.lookup(&key);
}

static __always_inline int hr_restore_peer(struct bpf_sock_addr *ctx, int v6)
{
    struct hr_set_key sets = {};
    struct hr_config *cfg = hr_pod_config(ctx, &sets);
    if (!cfg || !cfg->mode)
        return 1;
    u16 port = bpf_ntohs((u16)ctx->user_port);
    struct hr_orig *orig;
    if (ctx->type == HR_SOCK_STREAM) {
        /* only a peer on one of our ports can be a redirect (cheap filter before the lookup) */
        if (port != cfg->outbound_port && port != cfg->inbound_port && !(cfg->capture_dns && port == cfg->dns_port))
            return 1;
        orig = hr_tcp_orig_of(ctx);
    } else {
        if (!cfg->capture_dns || port != cfg->dns_port)
            return 1;
        if (!v6) {
            if (ctx->user_ip4 != bpf_htonl(0x7f000001))
                return 1;
        } else {
            u32 a2 = ctx->user_ip6[2];
            u32 a3 = ctx->user_ip6[3];
            if (a3 != bpf_htonl(1) && !(a2 == bpf_htonl(0xffff) && a3 == bpf_htonl(0x7f000001)))
                return 1;
        }
        u64 cookie = bpf_get_socket_cookie(ctx);
        orig = hr_dns_orig.lookup(&cookie);
    }
    if (!orig)
        return 1;
    if (!v6) {
        ctx->user_ip4 = orig->addr[3];
    } else {
        ctx->user_ip6[0] = orig->addr[0];
        ctx->user_ip6[1] = orig->addr[1];
        ctx->user_ip6[2] = orig->addr[2];
        ctx->user_ip6[3] = orig->addr[3];
    }
    ctx->user_port = orig->port;
    return 1;
}

int hr_recvmsg4(struct bpf_sock_addr *ctx) { return hr_restore_peer(ctx, 0); }
int hr_recvmsg6(struct bpf_sock_addr *ctx) { return hr_restore_peer(ctx, 1); }
int hr_getpeername4(struct bpf_sock_addr *ctx) { return hr_restore_peer(ctx, 0); }
int hr_getpeername6(struct bpf_sock_addr *ctx) { return hr_restore_peer(ctx, 1); }

/* ---- inbound: TC ingress in the pod netns ---------------------------------------------------------- */

/* The TC programs' pod config and set key. node (a constant at every call): from hr_pod_cfg under the
 * netns cookie hr_pod_tc holds for the pod's TC slot, which the agent gives its filters as their classid
 * (the kernel hands the filter's classid to the program in skb->tc_classid, 16 bits of it;
 * bpf_get_netns_cookie(skb) would answer for the packet's socket, which on ingress through a veth can be
 * the sender's, in another netns); else from the pod's own hr_cfg. */
static __always_inline struct hr_config *hr_tc_config(struct __sk_buff *skb, struct hr_set_key *sets, int node)
{
    struct hr_config *cfg;
    if (node) {
        u32 slot = skb->tc_classid;
        u64 *found = hr_pod_tc.lookup(&slot);
        if (!found)
            return NULL;
        u64 netns = *found;
        cfg = hr_pod_cfg.lookup(&netns);
    } else {
        int zero = 0;
        cfg = hr_cfg.lookup(&zero);
    }
    if (!cfg)
        return NULL;
    sets->netns = ((u64)cfg->netns_cookie_hi << 32) | cfg->netns_cookie_lo;
    sets->generation = cfg->generation;
    return cfg;
}

/* 1 when the inbound port is in the pod's set of that kind (node: the node map; else the pod's own) */
static __always_inline int hr_inbound_port_in(struct hr_set_key *sets, u16 kind, u16 port, int node)
{
    if (node)
        return hr_port_in(sets, kind, port);
    if (kind == HR_SET_XIN)
        return hr_cfg_xin.lookup(&port) != NULL;
    return hr_cfg_iin.lookup(&port) != NULL;
}

static __always_inline int hr_inbound_port_captured(struct hr_config *cfg, struct hr_set_key *sets, u16 port,
                                                    int node)
{
    if (cfg->inbound_mode == HR_INBOUND_NONE)
        return 0;
    if (port == cfg->inbound_port)
        return 0;
    if (hr_inbound_port_in(sets, HR_SET_XIN, port, node))
        return 0;
    if (cfg->inbound_mode == HR_INBOUND_LISTED && !hr_inbound_port_in(sets, HR_SET_IIN, port, node))
        return 0;
    return 1;
}

/* a TCP segment as both TC programs read it (addresses in the 16-byte form, ports in network order) */
struct hr_tcp_pkt {
    u32 saddr[4];
    u32 daddr[4];
    u16 sport;
    u16 dport;
    u32 l4off;
    u8 syn;
    u8 ack;
    u8 v4;
};

static __always_inline int hr_parse_tcp(struct __sk_buff *skb, struct hr_tcp_pkt *p)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return 0;
    struct tcphdr *tcp;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP || ip->ihl != 5)
            return 0;
        tcp = (void *)(ip + 1);
        if ((void *)(tcp + 1) > end)
            return 0;
        p->saddr[2] = bpf_htonl(0xffff);
        p->saddr[3] = ip->saddr;
        p->daddr[2] = bpf_htonl(0xffff);
        p->daddr[3] = ip->daddr;
        p->l4off = sizeof(*eth) + sizeof(*ip);
        p->v4 = 1;
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_TCP)
            return 0;
        tcp = (void *)(ip6 + 1);
        if ((void *)(tcp + 1) > end)
            return 0;
        __builtin_memcpy(p->saddr, &ip6->saddr, 16);
        __builtin_memcpy(p->daddr, &ip6->daddr, 16);
        p->l4off = sizeof(*eth) + sizeof(*ip6);
        p->v4 = 0;
    } else {
        return 0;
    }
    p->sport = tcp->source;
    p->dport = tcp->dest;
    p->syn = tcp->syn;
    p->ack = tcp->ack;
    return 1;
}

static __always_inline int hr_same_addr(u32 *a, u32 *b)
{
    return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* rewrite one TCP port (field offset 0: source, 2: destination) and fix the checksum by difference */
static __always_inline int hr_set_port(struct __sk_buff *skb, u32 l4off, u32 field, u16 from, u16 to)
{
    if (bpf_l4_csum_replace(skb, l4off + 16, from, to, sizeof(to)))
        return -1;
    return bpf_skb_store_bytes(skb, l4off + field, &to, sizeof(to), 0);
}

/* the socket lookup tuple of a segment (client -> pod), with destination port dport (network order) */
static __always_inline u32 hr_tuple(struct hr_tcp_pkt *p, struct bpf_sock_tuple *tuple, u16 dport)
{
    if (p->v4) {
        tuple->ipv4.saddr = p->saddr[3];
        tuple->ipv4.daddr = p->daddr[3];
        tuple->ipv4.sport = p->sport;
        tuple->ipv4.dport = dport;
        return sizeof(tuple->ipv4);
    }
    __builtin_memcpy(tuple->ipv6.saddr, p->saddr, 16);
    __builtin_memcpy(tuple->ipv6.daddr, p->daddr, 16);
    tuple->ipv6.sport = p->sport;
    tuple->ipv6.dport = dport;
    return sizeof(tuple->ipv6);
}

/* The accepted socket of a redirected flow (client -> pod:inbound port). create: store orig on it; 1 when
 * stored. Otherwise: 1 when its stored original destination is orig, 2 when it is an established socket
 * with nothing stored, 0 else. */
static __always_inline int hr_sock_orig(struct __sk_buff *skb, struct hr_tcp_pkt *p, u16 to, struct hr_orig *orig,
                                        int create)
{
    struct bpf_sock_tuple tuple = {};
    u32 tlen = hr_tuple(p, &tuple, to);
    struct bpf_sock *skc = bpf_skc_lookup_tcp(skb, &tuple, tlen, BPF_F_CURRENT_NETNS, 0);
    if (!skc)
        return 0;
    int ok = 0;
    struct bpf_sock *sk = bpf_sk_fullsock(skc);
    if (sk && sk->state != BPF_TCP_LISTEN) {
        if (create) {
            struct hr_orig copy = *orig;
            copy.family &= ~HR_NAT_SAVED;
            ok = hr_in_orig.sk_storage_get(sk, &copy, BPF_SK_STORAGE_GET_F_CREATE) != NULL;
        } else {
            struct hr_orig *got = hr_in_orig.sk_storage_get(sk, 0, 0);
            if (got)
                ok = got->port == orig->port && hr_same_addr(got->addr, orig->addr);
            else if (sk->state == BPF_TCP_ESTABLISHED)
                ok = 2;
        }
    }
    bpf_sk_release(skc);
    return ok;
}

/* A non-SYN segment hr_nat does not know (its entry evicted while the connection idled): part of a
 * redirected connection when the accepted socket of (client -> pod:inbound port) holds this destination.
 * That socket having nothing stored yet (no segment passed between the handshake and the eviction): the
 * segment is the flow's when the port is captured and no socket of (client -> pod:port) exists; its
 * destination is then stored there. */
static __always_inline int hr_inbound_flow_by_socket(struct __sk_buff *skb, struct hr_config *cfg,
                                                     struct hr_set_key *sets, struct hr_tcp_pkt *p, u16 to,
                                                     int node)
{
    struct hr_orig want = {};
    want.addr[0] = p->daddr[0];
    want.addr[1] = p->daddr[1];
    want.addr[2] = p->daddr[2];
    want.addr[3] = p->daddr[3];
    want.port = p->dport;
    want.family = p->v4 ? HR_AF_INET : HR_AF_INET6;
    int found = hr_sock_orig(skb, p, to, &want, 0);
    if (found != 2)
        return found;
    if (!hr_inbound_port_captured(cfg, sets, bpf_ntohs(p->dport), node))
        return 0;
    struct bpf_sock_tuple tuple = {};
    u32 tlen = hr_tuple(p, &tuple, p->dport);
    struct bpf_sock *direct = bpf_skc_lookup_tcp(skb, &tuple, tlen, BPF_F_CURRENT_NETNS, 0);
    if (direct) { /* the app's listener on that port is fine; a connection of that tuple is not ours */
        int conn = direct->state != BPF_TCP_LISTEN;
        bpf_sk_release(direct);
        if (conn)
            return 0;
    }
    return hr_sock_orig(skb, p, to, &want, 1);
}

/* Inbound as iptables REDIRECT in PREROUTING does it: a new connection to a captured port gets its
 * destination port rewritten to the proxy's inbound port (so the accepted socket's local address is
 * pod-ip:15006), every later segment of it too, and hr_tc_egress rewrites the replies' source port back;
 * hr_nat is that per-flow state (conntrack's job), keyed by (netns cookie, client address, client port). */
static __always_inline int hr_tc_in(struct __sk_buff *skb, int node)
{
    struct hr_set_key sets = {};
    struct hr_config *cfg = hr_tc_config(skb, &sets, node);
    if (!cfg || cfg->inbound_mode == HR_INBOUND_NONE)
        return TC_ACT_OK;
    struct hr_tcp_pkt p = {};
    if (!hr_parse_tcp(skb, &p) || !hr_family_wanted(cfg, p.v4))
        return TC_ACT_OK;
    if (p.v4) {
        if (cfg->probe_src4 && p.saddr[3] == cfg->probe_src4)
            return TC_ACT_OK;
    } else if (p.saddr[0] == cfg->probe_src6[0] && p.saddr[1] == cfg->probe_src6[1] &&
               p.saddr[2] == cfg->probe_src6[2] && p.saddr[3] == cfg->probe_src6[3]) {
        return TC_ACT_OK;
    }
    u16 to = bpf_htons(cfg->inbound_port);
    struct hr_conn_key key = {};
    key.netns = sets.netns;
    key.addr[0] = p.saddr[0];
    key.addr[1] = p.saddr[1];
    key.addr[2] = p.saddr[2];
    key.addr[3] = p.saddr[3];
    key.port = bpf_ntohs(p.sport);
    int new_conn = p.syn && !p.ack;
    struct bpf_sock_tuple tuple = {};
    u32 tlen = hr_tuple(&p, &tuple, p.dport);
    struct hr_orig *nat = hr_nat.lookup(&key);
    if (nat && !new_conn && nat->port == p.dport && hr_same_addr(nat->addr, p.daddr)) {
        /* copy the flow's state onto the accepted socket once it exists (the handshake's last ACK still
         * finds a request socket: the next segment does it) */
        if (!(nat->family & HR_NAT_SAVED) && hr_sock_orig(skb, &p, to, nat, 1))
            nat->family |= HR_NAT_SAVED;
        if (hr_set_port(skb, p.l4off, 2, p.dport, to))
            return TC_ACT_SHOT;
        return TC_ACT_OK;
    }
    /* a new connection straight to the inbound port from a client address/port that an older, rewritten
     * connection used: that state is stale (the two would be the same flow on the wire) */
    if (nat && new_conn && p.dport == to)
        hr_nat.delete(&key);
    if (!new_conn) {
        /* not in hr_nat (evicted while the connection idled): an established redirected flow is known by
         * its accepted socket's storage */
        if (p.dport != to && hr_inbound_flow_by_socket(skb, cfg, &sets, &p, to, node)) {
            if (hr_set_port(skb, p.l4off, 2, p.dport, to))
                return TC_ACT_SHOT;
        }
        return TC_ACT_OK;
    }
    if (!hr_inbound_port_captured(cfg, &sets, bpf_ntohs(p.dport), node))
        return TC_ACT_OK;
    /* a socket of this very connection already exists (made before capture began): the stack finds it */
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &tuple, tlen, BPF_F_CURRENT_NETNS, 0);
    if (sk) {
        int listening = sk->state == BPF_TCP_LISTEN;
        bpf_sk_release(sk);
        if (!listening)
            return TC_ACT_OK;
    }
    /* the proxy must be listening: otherwise fail closed, never deliver around the proxy */
    if (p.v4)
        tuple.ipv4.dport = to;
    else
        tuple.ipv6.dport = to;
    sk = bpf_skc_lookup_tcp(skb, &tuple, tlen, BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return TC_ACT_SHOT;
    int listening = sk->state == BPF_TCP_LISTEN;
    bpf_sk_release(sk);
    if (!listening)
        return TC_ACT_SHOT;
    struct hr_orig orig = {};
    orig.addr[0] = p.daddr[0];
    orig.addr[1] = p.daddr[1];
    orig.addr[2] = p.daddr[2];
    orig.addr[3] = p.daddr[3];
    orig.port = p.dport;
    orig.family = p.v4 ? HR_AF_INET : HR_AF_INET6;
    hr_nat.update(&key, &orig);
    hr_conn_orig.update(&key, &orig);
    if (hr_set_port(skb, p.l4off, 2, p.dport, to))
        return TC_ACT_SHOT;
    return TC_ACT_OK;
}

/* TC egress on the same interfaces: replies of a rewritten inbound connection leave from the port the
 * client dialled (the reverse of hr_tc_ingress, as conntrack un-NATs a REDIRECT) */
static __always_inline int hr_tc_out(struct __sk_buff *skb, int node)
{
    struct hr_set_key sets = {};
    struct hr_config *cfg = hr_tc_config(skb, &sets, node);
    if (!cfg || cfg->inbound_mode == HR_INBOUND_NONE)
        return TC_ACT_OK;
    struct hr_tcp_pkt p = {};
    if (!hr_parse_tcp(skb, &p))
        return TC_ACT_OK;
    if (p.sport != bpf_htons(cfg->inbound_port))
        return TC_ACT_OK;
    struct hr_conn_key key = {};
    key.netns = sets.netns;
    key.addr[0] = p.daddr[0];
    key.addr[1] = p.daddr[1];
    key.addr[2] = p.daddr[2];
    key.addr[3] = p.daddr[3];
    key.port = bpf_ntohs(p.dport);
    u16 orig_port = 0;
    struct bpf_sock *sk = skb->sk;
    if (sk)
        sk = bpf_sk_fullsock(sk);
    if (sk) { /* the accepted socket's own state first: it outlives any hr_nat eviction */
        struct hr_orig *own = hr_in_orig.sk_storage_get(sk, 0, 0);
        if (own && hr_same_addr(own->addr, p.saddr))
            orig_port = own->port;
    }
    if (!orig_port) {
        struct hr_orig *nat = hr_nat.lookup(&key);
        if (!nat || !hr_same_addr(nat->addr, p.saddr))
            return TC_ACT_OK;
        orig_port = nat->port;
        if (sk && !(nat->family & HR_NAT_SAVED)) {
            struct hr_orig copy = *nat;
            if (hr_in_orig.sk_storage_get(sk, &copy, BPF_SK_STORAGE_GET_F_CREATE))
                nat->family |= HR_NAT_SAVED;
        }
    }
    if (hr_set_port(skb, p.l4off, 0, p.sport, orig_port))
        return TC_ACT_SHOT;
    return TC_ACT_OK;
}

int hr_tc_ingress(struct __sk_buff *skb) { return hr_tc_in(skb, 0); }
int hr_tc_ingress_node(struct __sk_buff *skb) { return hr_tc_in(skb, 1); }
int hr_tc_egress(struct __sk_buff *skb) { return hr_tc_out(skb, 0); }
int hr_tc_egress_node(struct __sk_buff *skb) { return hr_tc_out(skb, 1); }

/* ---- the node's change count: what other processes did with bpf(2) ------------------------------------
 * Two tracepoint programs (loaded and attached by the agent, node_agent/backends/ebpf/bpf_watch.py) count
 * every bpf(2) command that can change how a pod's traffic is redirected: attaching or detaching a program
 * (cgroup hooks, tcx, links) and writing or deleting map elements. On sys_enter_bpf such a command marks
 * its thread (commands of the agent itself, its pid namespace and tgid in hr_watch_self, are not marked);
 * on sys_exit_bpf a marked thread's command is counted: once it has returned, its effect is there to be
 * read, so a check that read the count before it can never take a half-done command for none. While the
 * count stands still, nobody else can have changed a pod's cgroup programs or the node maps' entries, so
 * the drift poll skips reading them back (intact_cache). A map command on a map that is certainly not ours
 * (hr_map_not_ours: its name does not start with "hr_") is not counted, so another eBPF agent writing its
 * own maps all the time does not keep the count moving. */
struct hr_sys_enter {
    u64 common;       /* common_type, common_flags, common_preempt_count, common_pid */
    s32 syscall_nr;
    u32 pad;
    u64 args[6];      /* cmd, uattr, size */
};
struct hr_watch_self {
    u64 dev;          /* the agent's pid namespace: st_dev and st_ino of /proc/self/ns/pid */
    u64 ino;
    u32 tgid;         /* the agent's pid in it */
    u32 pad;
};
BPF_ARRAY(hr_watch_self, struct hr_watch_self, 1);
BPF_ARRAY(hr_bpf_changes, u64, 1);
BPF_TABLE("lru_hash", u64, u8, hr_watch_busy, 4096); /* threads inside a counted command */
/* Byte offsets along task_struct.files -> files_struct.fdt -> fdtable.max_fds, fdtable.fd -> file.private_data
 * -> bpf_map.name, read by the agent from the running kernel's BTF (btf_layout.py); valid 0: not known,
 * every map command counts. */
struct hr_watch_layout {
    u32 valid;
    u32 task_files;
    u32 files_fdt;
    u32 fdt_max_fds;
    u32 fdt_fd;
    u32 file_private;
    u32 map_name;
    u32 pad;
};
BPF_ARRAY(hr_watch_layout, struct hr_watch_layout, 1);

/* Whether the running task is the agent (its commands are not counted; the map unset: nobody is). */
static __always_inline int hr_watch_is_self(void) {
    u32 zero = 0;
    struct hr_watch_self *self = hr_watch_self.lookup(&zero);
    if (!self)
        return 1;
    struct bpf_pidns_info ns = {};
    return self->tgid && bpf_get_ns_current_pid_tgid(self->dev, self->ino, &ns, sizeof(ns)) == 0 &&
           ns.tgid == self->tgid;
}

/* Whether a map command's map is certainly not ours: the attribute's map fd (at byte `at` of it), looked up
 * in the calling task's file table, is a map whose name does not start with "hr_". Anything not known or not
 * readable may be ours: 0, counted. (A process that races its own attribute or file table against this read
 * can have a write of ours go uncounted; it holds an fd of our maps, i.e. it is root on the node, and the
 * pod's next full read finds what it did.) */
static __always_inline int hr_map_not_ours(u64 uattr, u32 at) {
    u32 zero = 0;
    struct hr_watch_layout *l = hr_watch_layout.lookup(&zero);
    if (!l || !l->valid)
        return 0;
    u64 task = bpf_get_current_task();
    u64 files = 0, fdt = 0, fds = 0, file = 0, map = 0;
    u32 fd = 0, max_fds = 0;
    char name[3] = {};
    if (bpf_probe_read_user(&fd, sizeof(fd), (void *)(uattr + at)) ||
        bpf_probe_read_kernel(&files, sizeof(files), (void *)(task + l->task_files)) || !files ||
        bpf_probe_read_kernel(&fdt, sizeof(fdt), (void *)(files + l->files_fdt)) || !fdt ||
        bpf_probe_read_kernel(&max_fds, sizeof(max_fds), (void *)(fdt + l->fdt_max_fds)) || fd >= max_fds ||
        bpf_probe_read_kernel(&fds, sizeof(fds), (void *)(fdt + l->fdt_fd)) || !fds ||
        bpf_probe_read_kernel(&file, sizeof(file), (void *)(fds + (u64)fd * sizeof(u64))) || !file ||
        bpf_probe_read_kernel(&map, sizeof(map), (void *)(file + l->file_private)) || !map ||
        bpf_probe_read_kernel(name, sizeof(name), (void *)(map + l->map_name)))
        return 0;
    return !(name[0] == 'h' && name[1] == 'r' && name[2] == '_');
}

#define HR_ATTR_MAP_FD 0        /* union bpf_attr: map_fd of the element commands */
#define HR_ATTR_BATCH_MAP_FD 36 /* batch.map_fd: after in_batch, out_batch, keys, values, count */

int hr_bpf_watch(void *ctx) {
    u64 cmd = ((struct hr_sys_enter *)ctx)->args[0];
    s32 map_fd_at = -1; /* map commands: where the attribute holds the map's fd */
    switch (cmd) {
    case BPF_MAP_UPDATE_ELEM:
    case BPF_MAP_DELETE_ELEM:
    case BPF_MAP_LOOKUP_AND_DELETE_ELEM:
        map_fd_at = HR_ATTR_MAP_FD;
        break;
    case BPF_MAP_LOOKUP_AND_DELETE_BATCH:
    case BPF_MAP_UPDATE_BATCH:
    case BPF_MAP_DELETE_BATCH:
        map_fd_at = HR_ATTR_BATCH_MAP_FD;
        break;
    case BPF_PROG_ATTACH:
    case BPF_PROG_DETACH:
    case BPF_LINK_CREATE:
    case BPF_LINK_UPDATE:
    case BPF_LINK_DETACH:
        break;
    default:
        return 0;
    }
    if (hr_watch_is_self())
        return 0;
    if (map_fd_at >= 0 && hr_map_not_ours(((struct hr_sys_enter *)ctx)->args[1], map_fd_at))
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u8 one = 1;
    hr_watch_busy.update(&id, &one);
    return 0;
}

int hr_bpf_watch_exit(void *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    if (!hr_watch_busy.lookup(&id))
        return 0;
    hr_watch_busy.delete(&id);
    u32 zero = 0;
    u64 *count = hr_bpf_changes.lookup(&zero);
    if (count)
        __sync_fetch_and_add(count, 1);
    return 0;
}

/* ---- the x_tables change count: what other processes did to legacy iptables tables ----------------------
 * Legacy iptables (x_tables) announces nothing either, and the drift check would read every legacy pod's
 * tables back each interval. A rule change is always a whole-table replace, setsockopt(SOL_IP or SOL_IPV6,
 * IPT_SO_SET_REPLACE == IP6T_SO_SET_REPLACE == 64) on any socket of the netns, made as that system call or
 * as an io_uring socket command. The system call: marked on sys_enter_setsockopt, counted on its exit (as
 * above). io_uring: the tracepoints do not say which socket command a request is, so every socket command
 * of another process counts, once when submitted and once when it completes; hr_xt_changes[1] counts those
 * in flight, and the agent trusts the count only while it is 0 (a command submitted with its completion
 * left unposted, or whose mark was evicted, keeps every pod on the poll: safe). Commands of 32-bit
 * processes are not seen by syscall tracepoints (nor bpf(2) above): found by each pod's full read. */
BPF_ARRAY(hr_xt_changes, u64, 2);                     /* [0] the count, [1] io_uring commands in flight */
BPF_TABLE("lru_hash", u64, u8, hr_xt_busy, 4096);     /* threads in a replace, io_uring commands in flight */

#define HR_SOL_IP 0
#define HR_SOL_IPV6 41
#define HR_IPT_SO_SET_REPLACE 64
#define HR_IORING_OP_URING_CMD 46
#define HR_IORING_OP_KNOWN 63  /* opcodes from here on are newer than this code: counted like a command */

struct hr_uring_req {  /* io_uring:io_uring_submit_req; io_uring_complete has ring and req at the same places */
    u64 common;
    u64 ring;
    u64 req;
    u64 user_data;
    u8 opcode;
};

static __always_inline void hr_xt_add(u32 index, u64 n) {
    u64 *v = hr_xt_changes.lookup(&index);
    if (v)
        __sync_fetch_and_add(v, n);
}

int hr_xt_watch(void *ctx) {
    struct hr_sys_enter *e = ctx;
    u32 level = (u32)e->args[1], optname = (u32)e->args[2];
    if ((level != HR_SOL_IP && level != HR_SOL_IPV6) || optname != HR_IPT_SO_SET_REPLACE || hr_watch_is_self())
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u8 one = 1;
    hr_xt_busy.update(&id, &one);
    return 0;
}

int hr_xt_watch_exit(void *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    if (!hr_xt_busy.lookup(&id))
        return 0;
    hr_xt_busy.delete(&id);
    hr_xt_add(0, 1);
    return 0;
}

int hr_xt_uring_submit(void *ctx) {
    struct hr_uring_req *r = ctx;
    u8 op = r->opcode;
    if ((op != HR_IORING_OP_URING_CMD && op < HR_IORING_OP_KNOWN) || hr_watch_is_self())
        return 0;
    u64 req = r->req;
    u8 one = 1;
    hr_xt_add(1, 1);  /* in flight before the count moves: a reader never sees the count settled early */
    hr_xt_add(0, 1);
    hr_xt_busy.update(&req, &one);  /* not marked (or the mark evicted): in flight for good, pods polled */
    return 0;
}

int hr_xt_uring_done(void *ctx) {
    u64 req = ((struct hr_uring_req *)ctx)->req;
    if (!hr_xt_busy.lookup(&req))
        return 0;
    hr_xt_busy.delete(&req);
    hr_xt_add(0, 1);  /* its effect is there: counted before it stops being in flight */
    hr_xt_add(1, (u64)-1);
    return 0;
}
