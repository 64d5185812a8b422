"""The nftables backend's table in real netns: canonical round trip, install / replace / remove, no
half-applied state on failure, drift found and repaired; the same for the plugin's `nft -f -` path.

Traffic behaviour is proven by the parity suites (test_sidecar_traffic.py, test_ambient_traffic.py,
test_backend_parity.py), which run over nftables too.
"""

from __future__ import annotations

import ipaddress

import pytest
from node_agent.backends.base import BackendError, PodTarget
from node_agent.backends.nftables import fresh_write
from node_agent.backends.nftables.backend import NftablesBackend

from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.kernel import iptables_run, nft_fresh, nft_tables, side_jobs
from cni.rules import nft_builder, nft_text
from tests.harness.netns import NetNS
from tests.unit.nft_scenarios import SCENARIOS

pytestmark = pytest.mark.kernel

SIDECAR = SidecarSpec(exclude_outbound_ports=(5432,), exclude_outbound_ranges=(ipaddress.ip_network("10.96.0.0/12"),))
AMBIENT = AmbientSpec(capture_dns=True)
FOREIGN = "table inet foreign {\n\tchain out {\n\t\ttype filter hook output priority 0; policy accept;\n\t}\n}\n"


@pytest.fixture
def ns(ns: NetNS) -> NetNS:
    """The kernel tests' new netns, `lo` up."""
    ns.run(["ip", "link", "set", "lo", "up"])
    return ns


def target(ns: NetNS, ips: tuple[str, ...] = ("10.9.0.2", "fd00:9::2")) -> PodTarget:
    return PodTarget(uid="u1", namespace="default", name="p", netns_path=ns.path, netns_inode=ns.inode(), ips=ips)


def tables(ns: NetNS) -> list[str]:
    return [line for line in ns.run(["nft", "list", "tables"]).stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_builder_text_is_what_nft_lists(ns: NetNS, name: str) -> None:
    """Every golden scenario loads and nft prints exactly the builder's text back (what CHECK relies on)."""
    table = SCENARIOS[name]()
    nft_tables.transaction(ns.path, nft_text.replace_text(table), "test")
    assert nft_tables.listing(ns.path, table.name) == table.render()


def test_install_replace_remove(ns: NetNS) -> None:
    ns.run(["nft", "-f", "-"], input=FOREIGN)
    backend = NftablesBackend()
    t = target(ns)
    assert not backend.installed(t)
    for _ in range(2):  # applying twice leaves one table
        backend.apply(t, SIDECAR)
        assert backend.check(t, SIDECAR) == []
    assert tables(ns) == ["table inet foreign", "table inet headrace"]
    backend.apply(t, AMBIENT)  # replaced in one transaction: no sidecar chain left
    assert backend.check(t, AMBIENT) == []
    listed = backend.listing(t)
    assert listed is not None and "sc_" not in listed and "am_prert" in listed
    assert backend.check(t, SIDECAR) != []
    backend.remove(t)
    assert not backend.installed(t)
    assert tables(ns) == ["table inet foreign"]  # nothing of ours left, the foreign table untouched
    backend.remove(t)  # idempotent


def test_v4_only_pod_gets_a_v4_only_table(ns: NetNS) -> None:
    backend = NftablesBackend()
    t = target(ns, ips=("10.9.0.2",))
    backend.apply(t, SIDECAR)
    listed = backend.listing(t)
    assert listed is not None and "ip6 " not in listed and "meta nfproto ipv4" in listed
    backend.remove(t)


def test_refused_transaction_leaves_the_old_table(ns: NetNS, monkeypatch: pytest.MonkeyPatch) -> None:
    """A transaction nft refuses changes nothing: the previous table (or none) stays exactly as it was."""
    backend = NftablesBackend()
    t = target(ns)
    real, real_create = nft_text.replace_text, nft_text.create_text

    def broken(table: nft_text.NftTable) -> str:
        return real(table) + "add rule inet headrace no_such_chain accept\n"

    def broken_create(table: nft_text.NftTable) -> str:
        return real_create(table) + "add rule inet headrace no_such_chain accept\n"

    monkeypatch.setattr(nft_text, "replace_text", broken)
    monkeypatch.setattr(nft_text, "create_text", broken_create)
    monkeypatch.setattr(fresh_write, "create_here", lambda _table: "not built in-process: the test's text")
    with pytest.raises(BackendError):
        backend.apply(t, SIDECAR)  # a fresh netns: created, refused, then replaced, refused too
    assert tables(ns) == []
    monkeypatch.setattr(nft_text, "replace_text", real)
    monkeypatch.setattr(nft_text, "create_text", real_create)
    backend.apply(t, SIDECAR)
    before = backend.listing(t)
    monkeypatch.setattr(nft_text, "replace_text", broken)
    with pytest.raises(BackendError):
        backend.apply(t, AMBIENT)
    assert backend.listing(t) == before
    assert backend.check(t, SIDECAR) == []


def test_side_job_failure_puts_the_old_table_back(ns: NetNS, monkeypatch: pytest.MonkeyPatch) -> None:
    """IPv6 sidecar: `::6` on lo fails after the table went in (the kernel refuses it: IPv6 is off on lo)
    → the table before is restored."""
    backend = NftablesBackend()
    t = target(ns)
    backend.apply(t, AMBIENT)
    before = backend.listing(t)
    ns.sysctl("net.ipv6.conf.lo.disable_ipv6", "1")
    with pytest.raises(BackendError, match="adding ::6 to lo"):
        backend.apply(t, SIDECAR)
    assert backend.listing(t) == before


def test_drift_removed_table_and_altered_rule_are_found_and_repaired(ns: NetNS) -> None:
    backend = NftablesBackend()
    t = target(ns)
    backend.apply(t, AMBIENT)
    ns.run(["nft", "delete", "table", "inet", "headrace"])
    assert backend.check(t, AMBIENT) == ["table inet headrace is missing"]
    backend.apply(t, AMBIENT)  # the repair: apply again, atomically
    assert backend.check(t, AMBIENT) == []
    ns.run(["nft", "flush", "chain", "inet", "headrace", "am_output"])
    problems = backend.check(t, AMBIENT)
    assert problems and all("am_output: missing rule" in p for p in problems)
    backend.apply(t, AMBIENT)
    assert backend.check(t, AMBIENT) == []
    ns.run(["nft", "add", "chain", "inet", "headrace", "intruder"])
    assert backend.check(t, AMBIENT) == ["table inet headrace: unexpected chain intruder"]
    backend.remove(t)


def test_check_after_restart_uses_the_canonical_text(ns: NetNS) -> None:
    """A new backend (agent restart) has no record of the apply: the builder's canonical text decides."""
    NftablesBackend().apply(target(ns), SIDECAR)
    fresh = NftablesBackend()
    assert fresh.installed(target(ns))
    assert fresh.check(target(ns), SIDECAR) == []
    fresh.remove(target(ns))


def test_gone_netns(ns: NetNS) -> None:
    backend = NftablesBackend()
    t = PodTarget(uid="u", namespace="d", name="p", netns_path="/run/netns/headrace-no-such-netns")
    backend.remove(t)
    assert not backend.installed(t)
    assert backend.check(t, AMBIENT) == ["network namespace /run/netns/headrace-no-such-netns does not exist"]


# ---- the plugin's standalone path: in-process create, else nft -f - ---------------------------------------


def test_plugin_path_add_twice_check_del(ns: NetNS) -> None:
    for _ in range(2):
        nft_tables.apply_sidecar(ns.path, SIDECAR, (4, 6))
    assert tables(ns) == ["table inet headrace"]
    assert nft_tables.check_sidecar(ns.path, SIDECAR, (4, 6)) == []
    assert "inet6 ::6/128" in ns.run(["ip", "-6", "addr", "show", "dev", "lo"]).stdout
    ns.run(["nft", "flush", "chain", "inet", "headrace", "sc_redirect"])
    assert any("sc_redirect: missing rule" in p for p in nft_tables.check_sidecar(ns.path, SIDECAR, (4, 6)))
    nft_tables.remove(ns.path)
    assert tables(ns) == []
    assert nft_tables.check_sidecar(ns.path, SIDECAR, (4, 6)) == ["table inet headrace is missing"]
    nft_tables.remove(ns.path)


def test_plugin_path_lo_failure_rolls_back(ns: NetNS, monkeypatch: pytest.MonkeyPatch) -> None:
    """The `nft -f` way (the in-process create declined): `ip` failing rolls the created table back."""
    monkeypatch.setattr(nft_fresh, "create_fresh", lambda *_a: "declined for the test")
    real_argv = iptables_run.netns_argv

    def failing_ip(netns_path: str | None, argv: list[str]) -> list[str]:
        return real_argv(netns_path, ["false", *argv[1:]] if argv[0] == "ip" else argv)

    monkeypatch.setattr(side_jobs, "netns_argv", failing_ip)
    with pytest.raises(iptables_run.IptablesError) as err:
        nft_tables.apply_sidecar(ns.path, SIDECAR, (4, 6))
    assert err.value.step == "lo-v6"
    assert tables(ns) == []


def test_plugin_path_tproxy_routes_follow_the_table(ns: NetNS) -> None:
    tproxy = SidecarSpec(interception_mode="TPROXY")
    nft_tables.apply_sidecar(ns.path, tproxy, (4, 6))
    assert nft_tables.check_sidecar(ns.path, tproxy, (4, 6)) == []
    assert "lookup 133" in ns.run(["ip", "rule"]).stdout
    nft_tables.apply_sidecar(ns.path, SidecarSpec(), (4, 6))  # back to REDIRECT: the routing goes
    assert "lookup 133" not in ns.run(["ip", "rule"]).stdout
    nft_tables.apply_sidecar(ns.path, tproxy, (4,))
    nft_tables.remove(ns.path)
    assert "lookup 133" not in ns.run(["ip", "rule"]).stdout
    assert tables(ns) == []


def test_node_probe_table(ns: NetNS) -> None:
    table = nft_builder.node_probe_table(["10.9.0.2", "fd00:9::2"])
    assert table is not None
    nft_tables.transaction(ns.path, nft_text.replace_text(table), "test")
    assert nft_tables.listing(ns.path, nft_text.NODE_TABLE) == table.render()
    nft_tables.transaction(ns.path, nft_text.remove_text(nft_text.NODE_TABLE), "test")
    assert tables(ns) == []

