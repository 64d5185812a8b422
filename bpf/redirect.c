/* headrace eBPF redirection programs (compiled once per agent process by bcc; loaded per pod).
 *
 * Per pod, attached to the pod's own cgroup v2 directory (BPF_F_ALLOW_MULTI), never host-wide:
 *   hr_connect4 / hr_connect6   cgroup/connect4|6: outbound TCP -> pod-ip:outbound_port (loopback when the
 *                               pod has no IP of the family), original destination remembered by socket
 *                               cookie; UDP :53 -> loopback:dns_port
 *   hr_sockops                  sock_ops: at TCP connect, move the original destination from the socket
 *                               cookie to the connection's client address/port (what the proxy sees)
 *   hr_getsockopt               cgroup/getsockopt: answers SO_ORIGINAL_DST (SOL_IP 80, SOL_IPV6 80) for
 *                               redirected connections from that map, as netfilter would after REDIRECT
 *   hr_sendmsg4|6, hr_recvmsg4|6, hr_getpeername4|6   DNS capture (unconnected sends, replies, peer name)
 * and inside the pod's netns only:
 *   hr_tc_ingress               TC ingress (clsact) on the pod's interfaces: a new inbound TCP connection is
 *                               handed to the proxy's inbound listener with bpf_sk_assign (TPROXY-like: the
 *                               accepted socket keeps the original local address); SO_ORIGINAL_DST answered
 *                               from hr_conn_orig like outbound
 *
 * Maps named hr_cfg_* are per pod (parameters); hr_conn_orig, hr_cookie_orig and hr_dns_orig are shared by
 * all pods of a node (keyed by socket cookie / netns cookie + client address) so that a proxy in another
 * cgroup can be answered too. UAPI headers only.
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
BPF_HASH(hr_cfg_xports, u16, u8, 1024);          /* excluded outbound ports (host order) */
BPF_LPM_TRIE(hr_cfg_xnets, struct hr_lpm_key, u8, 1024); /* excluded outbound ranges */
BPF_LPM_TRIE(hr_cfg_inets, struct hr_lpm_key, u8, 1024); /* included outbound ranges (when not all) */
BPF_HASH(hr_cfg_xin, u16, u8, 1024);             /* excluded inbound ports (host order) */
BPF_HASH(hr_cfg_iin, u16, u8, 1024);             /* included inbound ports (HR_INBOUND_LISTED) */
BPF_LPM_TRIE(hr_cfg_local, struct hr_lpm_key, u8, 64); /* the pod's own addresses (/128 each) */
BPF_TABLE("lru_hash", u64, struct hr_orig, hr_cookie_orig, 65536);
BPF_TABLE("lru_hash", struct hr_conn_key, struct hr_orig, hr_conn_orig, 65536);
BPF_TABLE("lru_hash", u64, struct hr_orig, hr_dns_orig, 65536);

/* 1 when the destination (16-byte form) must not be captured */
static __always_inline int hr_dest_excluded(struct hr_config *cfg, u32 *addr, u16 port, int v4)
{
    struct hr_lpm_key key = {};
    if (hr_cfg_xports.lookup(&port))
        return 1;
    key.prefixlen = 128;
    key.addr[0] = addr[0];
    key.addr[1] = addr[1];
    key.addr[2] = addr[2];
    key.addr[3] = addr[3];
    if (hr_cfg_xnets.lookup(&key))
        return 1;
    if (v4 ? cfg->include_all4 : cfg->include_all6)
        return 0;
    if (hr_cfg_inets.lookup(&key))
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

/* a destination routed over lo: loopback or one of the pod's own addresses (hr_cfg_local) */
static __always_inline int hr_is_local(u32 *addr, int v4)
{
    if (hr_is_loopback(addr, v4))
        return 1;
    struct hr_lpm_key key = {};
    key.prefixlen = 128;
    key.addr[0] = addr[0];
    key.addr[1] = addr[1];
    key.addr[2] = addr[2];
    key.addr[3] = addr[3];
    return hr_cfg_local.lookup(&key) != NULL;
}

#define HR_TO_OUTBOUND 1
#define HR_TO_INBOUND 2
#define HR_TO_DNS 3

static __always_inline int hr_connect(struct bpf_sock_addr *ctx, u32 *addr, int v4, int mapped)
{
    int zero = 0;
    struct hr_config *cfg = hr_cfg.lookup(&zero);
    if (!cfg || !cfg->mode)
        return 1;
    u16 port = bpf_ntohs((u16)ctx->user_port);
    u32 type = ctx->type;
    if (type != HR_SOCK_STREAM && type != HR_SOCK_DGRAM)
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
    int local = hr_is_local(addr, v4);
    int to = HR_TO_OUTBOUND;

    if (cfg->mode == HR_MODE_SIDECAR) {
        u64 ugid = bpf_get_current_uid_gid();
        int proxy = (u32)ugid == cfg->proxy_uid || (u32)(ugid >> 32) == cfg->proxy_gid;
        /* Envoy's inbound passthrough source 127.0.0.6 / ::6 over lo: never touched */
        int passthrough = family == HR_AF_INET ? s4 == bpf_htonl(0x7f000006)
                        : (s6_0 == 0 && s6_1 == 0 && ((s6_2 == 0 && s6_3 == bpf_htonl(6)) ||
                           (s6_2 == bpf_htonl(0xffff) && s6_3 == bpf_htonl(0x7f000006))));
        if (local && passthrough)
            return 1;
        if (proxy) {
            /* the proxy dialling the pod itself (not 127.0.0.1): goes through inbound, as with iptables */
            if (type == HR_SOCK_STREAM && local && !hr_is_lo_primary(addr, v4))
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
        if (cfg->capture_dns && port == HR_DNS_PORT)
            to = HR_TO_DNS; /* UDP and TCP 53 */
        else if (type != HR_SOCK_STREAM)
            return 1;
    }
    if (to == HR_TO_OUTBOUND && hr_dest_excluded(cfg, addr, port, v4))
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
    /* outbound TCP goes to the pod's own IP (routed over lo, the proxy's wildcard listener accepts it) so the
     * source the kernel picks next is the pod IP, as iptables REDIRECT keeps it; loopback when the pod has no
     * address of the family. Inbound (proxy -> own IP) and DNS keep loopback. */
    int self = to == HR_TO_OUTBOUND;
    u32 self4 = cfg->self_ip4;
    u32 self6_0 = cfg->self_ip6[0];
    u32 self6_1 = cfg->self_ip6[1];
    u32 self6_2 = cfg->self_ip6[2];
    u32 self6_3 = cfg->self_ip6[3];
    if (v4) {
        u32 dst4 = self && self4 ? self4 : bpf_htonl(0x7f000001);
        if (!mapped) {
            ctx->user_ip4 = dst4;
        } else {
            ctx->user_ip6[0] = 0;
            ctx->user_ip6[1] = 0;
            ctx->user_ip6[2] = bpf_htonl(0xffff);
            ctx->user_ip6[3] = dst4;
        }
    } else if (self && (self6_0 | self6_1 | self6_2 | self6_3)) {
        ctx->user_ip6[0] = self6_0;
        ctx->user_ip6[1] = self6_1;
        ctx->user_ip6[2] = self6_2;
        ctx->user_ip6[3] = self6_3;
    } else {
        ctx->user_ip6[0] = 0;
        ctx->user_ip6[1] = 0;
        ctx->user_ip6[2] = 0;
        ctx->user_ip6[3] = bpf_htonl(1);
    }
    ctx->user_port = bpf_htons(dport);
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

int hr_connect4(struct bpf_sock_addr *ctx)
{
    u32 addr[4] = {0, 0, bpf_htonl(0xffff), ctx->user_ip4};
    return hr_connect(ctx, addr, 1, 0);
}

int hr_connect6(struct bpf_sock_addr *ctx)
{
    u32 addr[4];
    int mapped = hr_user_addr6(ctx, addr);
    return hr_connect(ctx, addr, mapped, mapped);
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
    if (family == HR_AF_INET) {
        key->addr[2] = bpf_htonl(0xffff);
        key->addr[3] = ip4;
    } else {
        key->addr[0] = a0;
        key->addr[1] = a1;
        key->addr[2] = a2;
        key->addr[3] = a3;
    }
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
    if (family == HR_AF_INET) {
        key->addr[2] = bpf_htonl(0xffff);
        key->addr[3] = ip4;
    } else {
        key->addr[0] = a0;
        key->addr[1] = a1;
        key->addr[2] = a2;
        key->addr[3] = a3;
    }
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
    } else if (op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
        hr_conn_key_of_peer(skops, &key);
        if (hr_conn_orig.lookup(&key))
            bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
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
    if (family == HR_AF_INET) {
        key.addr[2] = bpf_htonl(0xffff);
        key.addr[3] = ip4;
    } else if (family == HR_AF_INET6) {
        key.addr[0] = a0;
        key.addr[1] = a1;
        key.addr[2] = a2;
        key.addr[3] = a3;
    } else {
        return 1;
    }
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
static __always_inline int hr_sendmsg(struct bpf_sock_addr *ctx, u32 *addr, int v4, int mapped)
{
    if (ctx->type != HR_SOCK_DGRAM)
        return 1;
    return hr_connect(ctx, addr, v4, mapped);
}

int hr_sendmsg4(struct bpf_sock_addr *ctx)
{
    u32 addr[4] = {0, 0, bpf_htonl(0xffff), ctx->user_ip4};
    return hr_sendmsg(ctx, addr, 1, 0);
}

int hr_sendmsg6(struct bpf_sock_addr *ctx)
{
    u32 addr[4];
    int mapped = hr_user_addr6(ctx, addr);
    return hr_sendmsg(ctx, addr, mapped, mapped);
}

static __always_inline int hr_restore_peer(struct bpf_sock_addr *ctx, int v6)
{
    int zero = 0;
    struct hr_config *cfg = hr_cfg.lookup(&zero);
    if (!cfg || !cfg->capture_dns)
        return 1;
    if (bpf_ntohs((u16)ctx->user_port) != cfg->dns_port)
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
    struct hr_orig *orig = hr_dns_orig.lookup(&cookie);
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

static __always_inline int hr_inbound_port_captured(struct hr_config *cfg, u16 port)
{
    if (cfg->inbound_mode == HR_INBOUND_NONE)
        return 0;
    if (port == cfg->inbound_port)
        return 0;
    if (hr_cfg_xin.lookup(&port))
        return 0;
    if (cfg->inbound_mode == HR_INBOUND_LISTED && !hr_cfg_iin.lookup(&port))
        return 0;
    return 1;
}

int hr_tc_ingress(struct __sk_buff *skb)
{
    int zero = 0;
    struct hr_config *cfg = hr_cfg.lookup(&zero);
    if (!cfg || cfg->inbound_mode == HR_INBOUND_NONE)
        return TC_ACT_OK;
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return TC_ACT_OK;
    struct bpf_sock_tuple tuple = {};
    struct bpf_sock_tuple ltuple = {};
    struct hr_conn_key key = {};
    struct hr_orig orig = {};
    struct tcphdr *tcp;
    u32 tlen;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP || ip->ihl != 5)
            return TC_ACT_OK;
        tcp = (void *)(ip + 1);
        if ((void *)(tcp + 1) > end)
            return TC_ACT_OK;
        if (cfg->probe_src4 && ip->saddr == cfg->probe_src4)
            return TC_ACT_OK;
        tuple.ipv4.saddr = ip->saddr;
        tuple.ipv4.daddr = ip->daddr;
        tuple.ipv4.sport = tcp->source;
        tuple.ipv4.dport = tcp->dest;
        ltuple.ipv4.saddr = ip->saddr;
        ltuple.ipv4.daddr = ip->daddr;
        ltuple.ipv4.sport = tcp->source;
        ltuple.ipv4.dport = bpf_htons(cfg->inbound_port);
        tlen = sizeof(tuple.ipv4);
        key.addr[2] = bpf_htonl(0xffff);
        key.addr[3] = ip->saddr;
        orig.addr[2] = bpf_htonl(0xffff);
        orig.addr[3] = ip->daddr;
        orig.family = HR_AF_INET;
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_TCP)
            return TC_ACT_OK;
        tcp = (void *)(ip6 + 1);
        if ((void *)(tcp + 1) > end)
            return TC_ACT_OK;
        if (ip6->saddr.in6_u.u6_addr32[0] == cfg->probe_src6[0] && ip6->saddr.in6_u.u6_addr32[1] == cfg->probe_src6[1] &&
            ip6->saddr.in6_u.u6_addr32[2] == cfg->probe_src6[2] && ip6->saddr.in6_u.u6_addr32[3] == cfg->probe_src6[3])
            return TC_ACT_OK;
        __builtin_memcpy(tuple.ipv6.saddr, &ip6->saddr, 16);
        __builtin_memcpy(tuple.ipv6.daddr, &ip6->daddr, 16);
        tuple.ipv6.sport = tcp->source;
        tuple.ipv6.dport = tcp->dest;
        __builtin_memcpy(ltuple.ipv6.saddr, &ip6->saddr, 16);
        __builtin_memcpy(ltuple.ipv6.daddr, &ip6->daddr, 16);
        ltuple.ipv6.sport = tcp->source;
        ltuple.ipv6.dport = bpf_htons(cfg->inbound_port);
        tlen = sizeof(tuple.ipv6);
        __builtin_memcpy(key.addr, &ip6->saddr, 16);
        __builtin_memcpy(orig.addr, &ip6->daddr, 16);
        orig.family = HR_AF_INET6;
    } else {
        return TC_ACT_OK;
    }
    u16 dport = bpf_ntohs(tcp->dest);
    if (!hr_inbound_port_captured(cfg, dport))
        return TC_ACT_OK;
    /* a socket of this very connection (request or established) already exists: the stack finds it */
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &tuple, tlen, BPF_F_CURRENT_NETNS, 0);
    if (sk) {
        int listening = sk->state == BPF_TCP_LISTEN;
        bpf_sk_release(sk);
        if (!listening)
            return TC_ACT_OK;
    }
    if (!tcp->syn || tcp->ack)
        return TC_ACT_OK;
    sk = bpf_skc_lookup_tcp(skb, &ltuple, tlen, BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return TC_ACT_SHOT; /* proxy not listening: fail closed, never deliver around the proxy */
    if (sk->state != BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        return TC_ACT_SHOT;
    }
    long err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    if (err)
        return TC_ACT_SHOT;
    key.netns = bpf_get_netns_cookie(skb);
    key.port = bpf_ntohs(tcp->source);
    orig.port = tcp->dest;
    hr_conn_orig.update(&key, &orig);
    return TC_ACT_OK;
}
