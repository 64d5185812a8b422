"""Ambient original-source delivery: the node proxy accepts inbound on 15006 in the pod netns and connects
to the app with IP_TRANSPARENT from the client's own address, its socket marked 0x539 (ztunnel's in-pod
SO_MARK; ztunnel's ENABLE_ORIG_SRC). The app then sees the real client address, and its replies go to the
client's address: only the ambient policy routing (`fwmark 0x111/0xfff lookup 100`, `local default dev lo
table 100`, with the ambient rules' CONNMARK restoring 0x111 on those replies) delivers them back to the
proxy's socket instead of out of the pod.

Proven with real traffic between two pods of the real bridge + host-local chain, IPv4 and IPv6, on the
iptables backends (legacy, nft), the nftables backend, and eBPF both as `--backend auto` / `ebpf` build it
(select_backend: ambient pods' inbound goes to the rules backend, sidecar pods' stays in TC eBPF) and with
every pod's inbound delegated to iptables:
- end to end: client → 15006 → proxy → app (from the client's address) → replies back to the client
  (test_orig_src_delivery_needs_the_policy_routing);
- negative control in the pod's own netns: without the rule, or without the route, the proxy's connection
  to the app fails; the backend's check names what is missing; re-applying repairs it;
- removal leaves no rule or route; a failed routing step rolls the rules and the other family back
  (test_routing_failure_rolls_ambient_back);
- the reference proxy's `--orig-src` mode delivers the same way (test_reference_proxy_orig_src).
An eBPF backend built with ambient inbound in TC (no rules backend for it; only tests build one) cannot do
this: the app's replies carry no mark there (no CONNMARK), so policy routing cannot tell them apart
(test_tc_inbound_cannot_route_the_replies); see docs/ebpf.md.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from node_agent.kernel.policy_routes_read import check_routing

from cni.contract.spec import AmbientSpec
from cni.kernel import iptables_run, side_jobs
from cni.kernel import tables as netns_tables
from cni.kernel.netns import entered
from cni.rules.tproxy_routes import AMBIENT
from tests.harness.netns import NetNS
from tests.harness.node import Pod
from tests.harness.traffic import Listener, tcp_request
from tests.kernel import test_refproxy as rp
from tests.kernel.redirect_backends import Redirect, ip, redirect_fixture

pytestmark = pytest.mark.kernel

PROXY_MARK = 0x539  # ztunnel's in-pod socket mark (DEFAULT_INPOD_MARK 1337)
IP_TRANSPARENT = 19  # SOL_IP
IPV6_TRANSPARENT = 75  # SOL_IPV6
APP_PORT = 8080
FLAVOURS = ("legacy", "nft")


@pytest.fixture
def redirect(request: pytest.FixtureRequest, make_node: Any) -> Iterator[Redirect]:
    yield from redirect_fixture(make_node, str(request.param))


over_iptables_and_families = pytest.mark.parametrize(
    ("redirect", "family"),
    [pytest.param(b, fam, id=f"{b}-{fam}") for b in ("iptables-legacy", "iptables-nft", "nftables") for fam in (4, 6)],
    indirect=["redirect"],
)


class OrigSrcProxy:
    """A minimal in-pod inbound proxy as ztunnel with ENABLE_ORIG_SRC: accepts on 15006 in the pod netns,
    reads the client's request, connects to the app from the client's address (IP_TRANSPARENT, SO_MARK
    0x539), relays the request and the app's whole reply. `errors`: upstream failures, in order."""

    def __init__(self, netns_path: str, family: int, app: tuple[str, int], connect_timeout: float = 2.0) -> None:
        self.netns_path = netns_path
        self.family = socket.AF_INET6 if family == 6 else socket.AF_INET
        self.app = app
        self.connect_timeout = connect_timeout
        self.errors: list[str] = []
        self.served = 0
        self._stop = threading.Event()
        with entered(netns_path):
            s = socket.socket(self.family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == 6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(("::" if family == 6 else "0.0.0.0", 15006))
        s.listen(16)
        s.settimeout(0.2)
        self._sock = s
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                self._relay(conn, peer[0])

    def _upstream(self, client_ip: str) -> socket.socket:
        with entered(self.netns_path):
            up = socket.socket(self.family, socket.SOCK_STREAM)
        up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, PROXY_MARK)
        if self.family == socket.AF_INET6:
            up.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            up.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        up.bind((client_ip, 0))  # the client's own address: possible only with IP_TRANSPARENT
        return up

    def _relay(self, conn: socket.socket, client_ip: str) -> None:
        conn.settimeout(5)
        request = _read_all(conn)
        try:
            with self._upstream(client_ip) as up:
                up.settimeout(self.connect_timeout)
                up.connect(self.app)
                up.settimeout(5)
                up.sendall(request)
                up.shutdown(socket.SHUT_WR)
                reply = _read_all(up)
        except OSError as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
            return
        conn.sendall(reply)
        self.served += 1

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=5)


def _read_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def in_netns(pod: Pod, *argv: str) -> str:
    return pod.netns.run(list(argv)).stdout


def request(client: Pod, app: Pod, family: int, payload: bytes) -> bytes:
    """The client pod connects to the app's port (captured to 15006); b"" when the proxy gave up."""
    try:
        return tcp_request(client.netns.path, ip(app, family), APP_PORT, payload, timeout=8.0)
    except OSError:
        return b""


@over_iptables_and_families
def test_orig_src_delivery_needs_the_policy_routing(redirect: Redirect, family: int) -> None:
    prove_orig_src(redirect, family)


@pytest.fixture
def ebpf_iptables_inbound(make_node: Any) -> Iterator[Redirect]:
    """The eBPF backend with its inbound delegated to iptables (kernels without TC support): ambient pods
    get the ambient iptables rules for inbound, and with them the policy routing."""
    from node_agent.backends.ebpf import pinning
    from node_agent.backends.ebpf.backend import EbpfBackend
    from node_agent.backends.iptables.backend import IptablesBackend
    from node_agent.backends.select import ebpf_problems

    problems = list(ebpf_problems())
    if problems:
        pytest.skip(f"eBPF cannot run here: {'; '.join(problems)}")
    node = make_node(headrace=None, pod_cgroups=True)
    backend = EbpfBackend(node.state_dir, inbound_fallback=IptablesBackend("nft"), proxy_cgroup=node.proxy_cgroup())
    rd = Redirect("ebpf", backend, node, str(node.proxy_cgroup()))
    try:
        yield rd
    finally:
        try:
            left = rd.remove_all()
        finally:
            pinning.unmount_bpffs(node.state_dir)
        assert not left, f"something of ours left after remove in pods {left}"


@pytest.mark.parametrize("family", [4, 6])
def test_orig_src_on_ebpf_with_iptables_inbound(ebpf_iptables_inbound: Redirect, family: int) -> None:
    prove_orig_src(ebpf_iptables_inbound, family)


@pytest.fixture(params=["auto", "ebpf"])
def ebpf_default(request: pytest.FixtureRequest, make_node: Any) -> Iterator[Redirect]:
    """The eBPF backend exactly as the agent builds it for `--backend auto` (on a node where eBPF runs) and
    `--backend ebpf`: select_backend with its default inbound mode."""
    from node_agent.backends.ebpf import pinning
    from node_agent.backends.ebpf.backend import EbpfBackend
    from node_agent.backends.select import ebpf_problems, select_backend

    problems = list(ebpf_problems())
    if problems:
        pytest.skip(f"eBPF cannot run here: {'; '.join(problems)}")
    node = make_node(headrace=None, pod_cgroups=True)
    choice = select_backend(
        str(request.param), state_dir=node.state_dir, iptables_flavour="nft", proxy_cgroup=node.proxy_cgroup(),
        problems_fn=lambda: problems,
    )  # fmt: skip
    assert isinstance(choice.backend, EbpfBackend) and choice.backend.inbound_in_ebpf  # sidecar inbound: TC
    assert "ambient pods' inbound via iptables" in choice.reason
    rd = Redirect("ebpf", choice.backend, node, str(node.proxy_cgroup()))
    try:
        yield rd
    finally:
        try:
            left = rd.remove_all()
        finally:
            pinning.unmount_bpffs(node.state_dir)
        assert not left, f"something of ours left after remove in pods {left}"


@pytest.mark.parametrize("family", [4, 6])
def test_orig_src_on_ebpf_as_the_agent_selects_it(ebpf_default: Redirect, family: int) -> None:
    """The default install on an eBPF node: outbound in eBPF (cgroup programs attached), ambient inbound by
    the rules backend with its policy routing (no TC filters), and original-source delivery works."""
    from tests.kernel.test_backend_parity import bpftool_cgroup, tc_filters

    def served_by_both(app: Pod) -> None:
        assert any(p["name"] == "hr_connect4" for p in bpftool_cgroup(app.pod_cgroup))
        assert tc_filters(app.netns.path) == []
        saved = iptables_run.save(app.netns.path, "nft", family).splitlines()  # type: ignore[arg-type]
        assert any("HEADRACE_AM_PRERT" in line for line in saved)

    prove_orig_src(ebpf_default, family, served_by_both)


@pytest.mark.parametrize("redirect", ["ebpf"], indirect=True)
def test_tc_inbound_cannot_route_the_replies(redirect: Redirect) -> None:
    """Why ambient inbound is not TC's on eBPF nodes: an EbpfBackend built with ambient inbound in TC (no
    rules backend) installs no policy routing and has no connection mark to route the app's replies by: they
    leave the pod, and the proxy's original-source connection to the app never completes."""
    app = redirect.pod("app")
    client = redirect.pod("client")
    redirect.apply(app, AmbientSpec())
    from tests.kernel.test_backend_parity import tc_filters

    assert tc_filters(app.netns.path)  # inbound captured in TC
    assert in_netns(app, "ip", "-4", "rule", "list", "pref", "32764").strip() == ""
    proxy = OrigSrcProxy(app.netns.path, 4, (ip(app, 4), APP_PORT), connect_timeout=1.5)
    try:
        with Listener(app.netns.path, APP_PORT, family=4, label="app") as appl:
            assert request(client, app, 4, b"one") == b""
            assert proxy.served == 0 and len(proxy.errors) == 1, proxy.errors
            assert appl.count() == 0
    finally:
        proxy.close()


def prove_orig_src(redirect: Redirect, family: int, inspect: Callable[[Pod], None] | None = None) -> None:
    """The end-to-end proof, the negative controls, the repair and the removal, on one backend (inspect:
    more checks of the enrolled app pod)."""
    app = redirect.pod("app")
    client = redirect.pod("client")
    spec = AmbientSpec()
    target = redirect.apply(app, spec)  # backend.check == [] includes the policy routing
    if inspect is not None:
        inspect(app)
    fam = f"-{family}"
    rules = in_netns(app, "ip", fam, "rule", "list", "pref", "32764").split()
    assert rules == ["32764:", "from", "all", "fwmark", "0x111/0xfff", "lookup", "100"]
    assert in_netns(app, "ip", fam, "route", "list", "table", "100").split()[:4] == ["local", "default", "dev", "lo"]
    assert check_routing(app.netns.path, (4, 6), AMBIENT) == []

    proxy = OrigSrcProxy(app.netns.path, family, (ip(app, family), APP_PORT))
    try:
        with Listener(app.netns.path, APP_PORT, family=family, label="app") as appl:
            # end to end: the app sees the client's own address, the client gets the app's reply
            assert request(client, app, family, b"one") == b"app|one"
            assert appl.wait_one().peer[0] == ip(client, family)
            assert proxy.served == 1 and proxy.errors == []

            # negative control: without the rule the app's replies leave the pod, the connection fails
            rule = ["ip", fam, "rule", "del", "pref", "32764", "fwmark", "0x111/0xfff", "lookup", "100"]
            in_netns(app, *rule)
            problems = redirect.backend.check(target, spec)
            assert any("ip rule 'pref 32764 fwmark 0x111/0xfff lookup 100' is missing" in p for p in problems)
            # the in-process (rtnetlink) read and the `ip` read agree
            missing = [f"IPv{family} policy routing: ip rule 'pref 32764 fwmark 0x111/0xfff lookup 100' is missing"]
            assert check_routing(app.netns.path, (family,), AMBIENT) == missing
            assert netns_tables.check_ambient_routes(app.netns.path, (family,)) == missing  # type: ignore[arg-type]
            assert request(client, app, family, b"two") == b""
            assert proxy.served == 1 and len(proxy.errors) == 1, proxy.errors
            assert appl.count() == 0

            # re-applying (what the agent's drift repair does) puts it back
            redirect.backend.apply(target, spec)
            assert redirect.backend.check(target, spec) == []
            assert request(client, app, family, b"three") == b"app|three"
            assert appl.wait_one().peer[0] == ip(client, family)

            # the same without the route
            in_netns(app, "ip", fam, "route", "del", "local", "default", "dev", "lo", "table", "100")
            problems = redirect.backend.check(target, spec)
            assert any("route 'local default dev lo' in table 100 is missing" in p for p in problems)
            assert request(client, app, family, b"four") == b""
            assert proxy.served == 2 and len(proxy.errors) == 2, proxy.errors
            redirect.backend.apply(target, spec)
            assert redirect.backend.check(target, spec) == []
            assert request(client, app, family, b"five") == b"app|five"
    finally:
        proxy.close()

    # removal takes the routing with the rules
    redirect.backend.remove(target)
    assert not redirect.backend.installed(target)
    for f in ("-4", "-6"):
        assert in_netns(app, "ip", f, "rule", "list", "pref", "32764").strip() == ""
        assert app.netns.run(["ip", f, "route", "list", "table", "100"], check=False).stdout.strip() == ""


def ours(n: NetNS, fl: str) -> tuple[list[str], list[str]]:
    """(HEADRACE lines of both families, the ambient policy-routing entries of both families)."""
    lines = [
        line
        for family in (4, 6)
        for line in iptables_run.save(n.path, fl, family).splitlines()  # type: ignore[arg-type]
        if "HEADRACE" in line
    ]
    routing: list[str] = []
    for family in (4, 6):
        routing += [r for r in n.run(["ip", f"-{family}", "rule", "list"]).stdout.splitlines() if "lookup 100" in r]
        routing += n.run(["ip", f"-{family}", "route", "list", "table", "100"], check=False).stdout.splitlines()
    return lines, routing


@pytest.mark.parametrize("fl", FLAVOURS)
def test_routing_failure_rolls_ambient_back(ns: NetNS, fl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real_argv = iptables_run.netns_argv

    def failing_ip6(netns_path: str | None, argv: list[str]) -> list[str]:
        return real_argv(netns_path, ["false", *argv[1:]] if argv[:2] == ["ip", "-6"] else argv)

    with monkeypatch.context() as m:
        m.setattr(side_jobs, "netns_argv", failing_ip6)
        with pytest.raises(iptables_run.IptablesError) as err:
            netns_tables.apply_ambient(ns.path, AmbientSpec(), (4, 6), fl)  # type: ignore[arg-type]
    assert err.value.step == "ambient-routes-v6"
    assert ours(ns, fl) == ([], [])  # the rules and the IPv4 rule/route that went in were taken back
    # a good apply puts in 2 entries per family; remove_all takes them out again
    netns_tables.apply_ambient(ns.path, AmbientSpec(), (4, 6), fl)  # type: ignore[arg-type]
    assert len(ours(ns, fl)[1]) == 4
    assert netns_tables.check_ambient_routes(ns.path, (4, 6)) == []
    netns_tables.remove_all(ns.path, fl)  # type: ignore[arg-type]
    assert ours(ns, fl) == ([], [])


@pytest.fixture
def refproxy_world() -> Iterator[rp.World]:
    tmp = tempfile.mkdtemp(prefix="hr-rpo-", dir="/tmp")
    try:
        yield from rp.make_world(tmp, netns_fd=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("family", [4, 6])
def test_reference_proxy_orig_src(refproxy_world: rp.World, family: int) -> None:
    """`headrace proxy --orig-src` (the reference proxy's ztunnel-like delivery) over the ambient rules and
    routing (apply_ambient): the app sees the client's address; without the rule the inbound hop fails."""
    w = refproxy_world
    w.proxy.stop()
    w.proxy.argv.append("--orig-src")
    w.proxy.start()
    rp.enrol_both(w)
    cip, sip = w.client_ips[family == 6], w.server_ips[family == 6]
    assert rp.request(w.client, sip, b"hello") == b"got:hello"
    peer, got = w.app.received.get(timeout=rp.T)
    assert (peer, got) == (cip, b"hello")  # the client's own address, not the server pod's
    assert all("error" not in line for line in w.proxy.next_lines(2))

    w.server.run(["ip", f"-{family}", "rule", "del", "pref", "32764", "fwmark", "0x111/0xfff", "lookup", "100"])
    with contextlib.suppress(OSError):
        assert rp.request(w.client, sip, b"again") == b""
    inbound = [line for line in w.proxy.next_lines(2) if line["direction"] == "inbound"]
    assert inbound and "error" in inbound[0], inbound
    assert w.app.received.empty()


def test_routing_alone_for_other_packet_filter_backends(ns: NetNS) -> None:
    """add_routes / undo_routes / check_routes / remove_routes: the routing without iptables (what a
    backend that writes its rules some other way uses); an add that meets existing entries undoes none."""
    from cni.kernel import tproxy

    jobs = tproxy.add_routes(ns.path, (4, 6), AMBIENT)
    assert len(ours(ns, "nft")[1]) == 4 and tproxy.check_routes(ns.path, (4, 6), AMBIENT) == []
    again = tproxy.add_routes(ns.path, (4, 6), AMBIENT)  # idempotent: nothing new, nothing to undo
    tproxy.undo_routes(ns.path, again)
    assert len(ours(ns, "nft")[1]) == 4
    tproxy.undo_routes(ns.path, jobs)
    assert ours(ns, "nft")[1] == []
    assert len(tproxy.check_routes(ns.path, (4, 6), AMBIENT)) == 4
    tproxy.add_routes(ns.path, (4,), AMBIENT)
    tproxy.remove_routes(ns.path, (4, 6), AMBIENT)
    assert ours(ns, "nft")[1] == []
