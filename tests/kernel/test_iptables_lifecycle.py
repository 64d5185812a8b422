"""Apply/replace/check/remove/rollback of our chains in real netns, both flavours, both families.

Also: the builder emits iptables-save canonical syntax (kernel round trip of every golden scenario), and
the flavour lesson Istio's CNI plugin learnt (count rules, not chain headers).
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import threading

import pytest
from node_agent.backends.base import BackendError, PodTarget
from node_agent.backends.iptables.backend import IptablesBackend

from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.kernel import apply, flavour, iptables_run
from cni.kernel import tables as netns_tables
from cni.rules import builder, saved, transition
from tests.harness.netns import NetNS

pytestmark = pytest.mark.kernel

FLAVOURS = ["legacy", "nft"]
net = ipaddress.ip_network

FOREIGN_V4 = """*nat
:FOREIGN_NAT - [0:0]
-A OUTPUT -d 192.0.2.1/32 -j RETURN
-A OUTPUT -j FOREIGN_NAT
-A PREROUTING -p udp -j FOREIGN_NAT
-A FOREIGN_NAT -p tcp -m tcp --dport 9999 -j RETURN
COMMIT
*mangle
:FOREIGN_M - [0:0]
-A PREROUTING -j FOREIGN_M
-A FOREIGN_M -j MARK --set-xmark 0x7/0xff
COMMIT
"""
FOREIGN_V6 = FOREIGN_V4.replace("192.0.2.1/32", "2001:db8::1/128")


def restore(n: NetNS, fl: str, family: int, text: str) -> None:
    n.run([flavour.binary(fl, family, "restore"), "--noflush"], input=text)  # type: ignore[arg-type]


def normalized(n: NetNS, fl: str, family: int) -> str:
    """iptables-save without comments and counters (traffic changes counters, not rules)."""
    text = iptables_run.save(n.path, fl, family)  # type: ignore[arg-type]
    lines = [re.sub(r"\[\d+:\d+\]", "[0:0]", x) for x in text.splitlines() if not x.startswith("#")]
    return "\n".join(lines)


def our_lines(n: NetNS, fl: str, family: int) -> list[str]:
    return [x for x in normalized(n, fl, family).splitlines() if "HEADRACE_" in x]


SIDECAR = SidecarSpec(
    exclude_outbound_ports=(5432,), exclude_outbound_ranges=(net("10.96.0.0/12"), net("fd00:96::/64"))
)
AMBIENT = AmbientSpec(capture_dns=True)


@pytest.mark.parametrize("fl", FLAVOURS)
def test_apply_twice_is_one_set(ns, fl) -> None:
    for _ in range(2):
        netns_tables.apply_sidecar(ns.path, SIDECAR, (4, 6), fl)
        netns_tables.apply_ambient(ns.path, AMBIENT, (4, 6), fl)
    for family in (4, 6):
        tables = saved.parse_save(iptables_run.save(ns.path, fl, family))
        for table in tables.values():
            lines = [line for _, line in table.rules if "HEADRACE_" in line]
            assert len(lines) == len(set(lines)), f"duplicated rules in {table.name}"
        expected = builder.sidecar_rules(SIDECAR, family).tables[0]
        for chain in expected.chains:
            want = [r for r in expected.rules if r.split(" ", 2)[1] == chain]
            assert tables["nat"].chain_rules(chain) == want
    assert netns_tables.check_sidecar(ns.path, SIDECAR, (4, 6), fl) == []
    assert netns_tables.check_ambient(ns.path, AMBIENT, (4, 6), fl) == []


@pytest.mark.parametrize("fl", FLAVOURS)
def test_concurrent_applies_leave_one_set(ns, fl) -> None:
    """Writers are serialised per netns (flock on the netns file): without it, two save→restore cycles
    interleave and both insert their jumps."""
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            netns_tables.apply_ambient(ns.path, AMBIENT, (4, 6), fl)
            netns_tables.sync_node_probe_rules(ns.path, ["10.7.0.1"], fl)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert netns_tables.check_ambient(ns.path, AMBIENT, (4, 6), fl) == []
    assert netns_tables.check_node_probe_rules(ns.path, ["10.7.0.1"], fl) == []


@pytest.mark.parametrize("fl", FLAVOURS)
def test_reapply_with_other_spec_replaces(ns, fl) -> None:
    netns_tables.apply_sidecar(ns.path, SIDECAR, (4, 6), fl)
    other = SidecarSpec(include_inbound_ports=(8080,), include_outbound_ranges=(net("10.0.0.0/8"),))
    netns_tables.apply_sidecar(ns.path, other, (4, 6), fl)
    assert netns_tables.check_sidecar(ns.path, other, (4, 6), fl) == []
    assert netns_tables.check_sidecar(ns.path, SIDECAR, (4, 6), fl) != []
    assert not any("5432" in x for x in our_lines(ns, fl, 4))


@pytest.mark.parametrize("fl", FLAVOURS)
def test_check_detects_drift_and_reapply_repairs(ns, fl) -> None:
    netns_tables.apply_ambient(ns.path, AMBIENT, (4, 6), fl)
    ns.run([f"ip6tables-{fl}", "-t", "nat", "-F", "HEADRACE_AM_OUTPUT"])
    problems = netns_tables.check_ambient(ns.path, AMBIENT, (4, 6), fl)
    assert problems and all(p.startswith("IPv6 nat: chain HEADRACE_AM_OUTPUT") for p in problems), problems
    mangle = builder.ambient_rules(AMBIENT, 4).table("mangle")
    assert mangle is not None
    jump = mangle.jumps[0]  # "-A PREROUTING ... -j HEADRACE_AM_PRERT", with its purpose comment
    ns.run([f"iptables-{fl}", "-t", "mangle", "-D", *shlex.split(jump)[1:]])
    problems = netns_tables.check_ambient(ns.path, AMBIENT, (4, 6), fl)
    assert any(f"IPv4 mangle: jump '{jump}' is missing" in p for p in problems)
    ns.run([f"iptables-{fl}", "-t", "nat", "-X", "HEADRACE_AM_PRERT"], check=False)  # referenced: fails
    nat = builder.ambient_rules(AMBIENT, 4).table("nat")
    assert nat is not None
    ns.run([f"iptables-{fl}", "-t", "nat", *shlex.split(nat.jumps[1])])  # "-A OUTPUT ... -j HEADRACE_AM_OUTPUT"
    assert any("2 times" in p for p in netns_tables.check_ambient(ns.path, AMBIENT, (4, 6), fl))
    netns_tables.apply_ambient(ns.path, AMBIENT, (4, 6), fl)
    assert netns_tables.check_ambient(ns.path, AMBIENT, (4, 6), fl) == []


@pytest.mark.parametrize("fl", FLAVOURS)
def test_remove_restores_exact_previous_state(ns, fl) -> None:
    restore(ns, fl, 4, FOREIGN_V4)
    restore(ns, fl, 6, FOREIGN_V6)
    before = {f: normalized(ns, fl, f) for f in (4, 6)}
    netns_tables.apply_sidecar(ns.path, SIDECAR, (4, 6), fl)
    netns_tables.apply_ambient(ns.path, AMBIENT, (4, 6), fl)
    assert netns_tables.installed(ns.path, fl)
    # foreign rules are kept in place while ours are in
    assert "-A OUTPUT -d 192.0.2.1/32 -j RETURN" in normalized(ns, fl, 4)
    netns_tables.remove_all(ns.path, fl)
    assert {f: normalized(ns, fl, f) for f in (4, 6)} == before
    assert not netns_tables.installed(ns.path, fl)
    netns_tables.remove_all(ns.path, fl)  # idempotent
    assert {f: normalized(ns, fl, f) for f in (4, 6)} == before


@pytest.mark.parametrize("fl", FLAVOURS)
def test_apply_remove_on_fresh_netns_leaves_only_empty_tables(ns, fl) -> None:
    """A fresh pod netns has no tables; afterwards only empty built-in chains with ACCEPT policy remain
    (legacy tables cannot be unloaded), which is the same ruleset as before."""
    netns_tables.apply_sidecar(ns.path, SIDECAR, (4, 6), fl)
    netns_tables.apply_ambient(ns.path, AMBIENT, (4, 6), fl)
    netns_tables.remove_all(ns.path, fl)
    for family in (4, 6):
        for line in normalized(ns, fl, family).splitlines():
            assert line.startswith(("*", "COMMIT")) or re.fullmatch(r":[A-Z]+ ACCEPT \[0:0\]", line), line


@pytest.mark.parametrize("fl", FLAVOURS)
def test_remove_on_clean_netns_creates_nothing(ns, fl) -> None:
    netns_tables.remove_all(ns.path, fl)
    assert normalized(ns, fl, 4) == "" and normalized(ns, fl, 6) == ""
    assert not netns_tables.installed(ns.path, fl)


@pytest.mark.parametrize("fl", FLAVOURS)
def test_missing_netns(fl) -> None:
    path = "/run/netns/headrace-does-not-exist"
    netns_tables.remove_all(path, fl)
    assert not netns_tables.installed(path, fl)
    assert netns_tables.check_sidecar(path, SidecarSpec(), (4,), fl) == [f"network namespace {path} does not exist"]
    with pytest.raises(iptables_run.IptablesError) as err:
        netns_tables.apply_sidecar(path, SidecarSpec(), (4,), fl)
    assert err.value.step == "apply-sidecar"


@pytest.mark.parametrize("fl", FLAVOURS)
def test_v6_failure_rolls_v4_back(ns, fl, monkeypatch) -> None:
    restore(ns, fl, 4, FOREIGN_V4)
    old = SidecarSpec(exclude_outbound_ports=(1111,))
    netns_tables.apply_sidecar(ns.path, old, (4,), fl)
    before = normalized(ns, fl, 4)
    real = flavour.binary

    def broken_v6_restore(fla, family, tool):
        """Fault injection at the process level: the v6 restore binary does not exist."""
        return "ip6tables-headrace-missing" if (family, tool) == (6, "restore") else real(fla, family, tool)

    monkeypatch.setattr(iptables_run, "binary", broken_v6_restore)
    with pytest.raises(iptables_run.IptablesError) as err:
        netns_tables.apply_sidecar(ns.path, SIDECAR, (4, 6), fl)
    assert err.value.step == "apply-sidecar-v6" and "ip6tables-headrace-missing" in err.value.stderr
    assert normalized(ns, fl, 4) == before
    assert netns_tables.check_sidecar(ns.path, old, (4,), fl) == []
    assert "HEADRACE" not in normalized(ns, fl, 6)


@pytest.mark.parametrize("fl", FLAVOURS)
def test_bad_restore_input_leaves_netns_untouched(ns, fl) -> None:
    """A restore that iptables rejects changes nothing (one transaction per family)."""
    netns_tables.apply_sidecar(ns.path, SidecarSpec(), (4,), fl)
    before = normalized(ns, fl, 4)
    with pytest.raises(iptables_run.IptablesError) as err:
        iptables_run.restore(ns.path, fl, 4, "*nat\n-F HEADRACE_SC_OUTPUT\n-A NO_SUCH_CHAIN -j RETURN\nCOMMIT\n", "t")
    assert err.value.stderr
    assert normalized(ns, fl, 4) == before


@pytest.mark.parametrize("fl", FLAVOURS)
def test_node_probe_sync_replaces_whole_chain(ns, fl) -> None:
    netns_tables.sync_node_probe_rules(ns.path, ["10.9.0.1", "10.9.0.2", "fd00:9::1"], fl)
    netns_tables.sync_node_probe_rules(ns.path, ["10.9.0.2", "10.9.0.3"], fl)
    assert netns_tables.check_node_probe_rules(ns.path, ["10.9.0.3", "10.9.0.2"], fl) == []
    v4 = our_lines(ns, fl, 4)
    assert sum(x.startswith("-A HEADRACE_POSTROUTING") for x in v4) == 2
    assert "HEADRACE" not in normalized(ns, fl, 6)
    assert netns_tables.check_node_probe_rules(ns.path, ["10.9.0.3"], fl) != []
    with pytest.raises(ValueError, match="invalid pod IP"):
        netns_tables.sync_node_probe_rules(ns.path, ["10.9.0.300"], fl)
    netns_tables.sync_node_probe_rules(ns.path, [], fl)
    assert not netns_tables.installed(ns.path, fl)


# ---------------------------------------------------------------- canonical syntax round trip

ROUNDTRIP: dict[str, list[builder.RuleSet]] = {
    "sidecar_default": [builder.sidecar_rules(SidecarSpec(), f) for f in (4, 6)],
    "sidecar_excludes": [builder.sidecar_rules(SIDECAR, f) for f in (4, 6)],
    "sidecar_includes": [
        builder.sidecar_rules(
            SidecarSpec(
                include_inbound_ports=(80, 8080),
                include_outbound_ranges=(net("10.0.0.0/8"), net("fd00::/8")),
                exclude_outbound_ranges=(net("10.1.0.0/16"),),
            ),
            f,
        )
        for f in (4, 6)
    ],
    "sidecar_istio_parity": [
        builder.sidecar_rules(
            SidecarSpec(
                include_outbound_ports=(5432, 9090),
                include_outbound_ranges=(net("10.0.0.0/8"), net("fd00::/8")),
                exclude_interfaces=("net1",),
                kubevirt_interfaces=("eth1", "eth2"),
            ),
            f,
        )
        for f in (4, 6)
    ],
    "sidecar_tproxy_interfaces": [
        builder.sidecar_rules(
            SidecarSpec(interception_mode="TPROXY", exclude_interfaces=("net1",), kubevirt_interfaces=("eth1",)), f
        )
        for f in (4, 6)
    ],
    "ambient_default": [builder.ambient_rules(AmbientSpec(), f) for f in (4, 6)],
    "ambient_full": [
        builder.ambient_rules(
            AmbientSpec(
                capture_dns=True,
                exclude_inbound_ports=(22,),
                exclude_outbound_ports=(25,),
                exclude_outbound_ranges=(net("10.96.0.0/12"), net("fd00:96::/64")),
            ),
            f,
        )
        for f in (4, 6)
    ],
    "node_probe": [builder.node_probe_rules(["10.1.2.3", "10.1.2.4", "fd00:1::3"], f) for f in (4, 6)],
}


@pytest.mark.parametrize("scenario", sorted(ROUNDTRIP))
@pytest.mark.parametrize("fl", FLAVOURS)
def test_builder_output_is_iptables_save_canonical(ns, fl, scenario) -> None:
    rulesets = ROUNDTRIP[scenario]
    for rs in rulesets:
        apply.set_owned(ns.path, fl, rs.family, transition.desired_from_ruleset(rs), rs.owner_prefix, "t")
        dump = saved.parse_save(iptables_run.save(ns.path, fl, rs.family))
        for t in rs.tables:
            for chain in t.chains:
                expect = [r for r in t.rules if r.split(" ", 2)[1] == chain]
                assert dump[t.table].chain_rules(chain) == expect
            for jump in t.jumps:
                assert jump in [line for _, line in dump[t.table].rules]
    assert apply.check_rulesets(ns.path, rulesets, fl) == []


# ---------------------------------------------------------------- flavour lesson (count rules)


def test_flavour_counts_rules_not_chain_headers(ns) -> None:
    assert flavour.detect(ns.path) == "nft"  # nothing anywhere: tie → nft
    # An nft host with a few real rules, plus leftover EMPTY legacy tables/chains (e.g. a canary)…
    nft_rules = "-A POSTROUTING -s 10.0.0.0/8 -j MASQUERADE\n-A POSTROUTING -s 10.1.0.0/16 -j MASQUERADE\n"
    restore(ns, "nft", 4, f"*nat\n{nft_rules}COMMIT\n")
    canary = ":KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n"
    restore(ns, "legacy", 4, f"*nat\n{canary}*mangle\n{canary}")
    legacy_lines = len(iptables_run.save(ns.path, "legacy", 4).splitlines())
    nft_lines = len(iptables_run.save(ns.path, "nft", 4).splitlines())
    assert legacy_lines > nft_lines  # a line-count heuristic would pick legacy here
    assert flavour.detect(ns.path) == "nft"
    # A host whose real rules are legacy ones is detected as legacy.
    restore(ns, "legacy", 6, "*filter\n-A INPUT -j ACCEPT\n-A OUTPUT -j ACCEPT\n-A FORWARD -j ACCEPT\nCOMMIT\n")
    assert flavour.detect(ns.path) == "legacy"


# ---------------------------------------------------------------- the agent backend


@pytest.mark.parametrize("fl", FLAVOURS)
def test_iptables_backend(ns, fl) -> None:
    backend = IptablesBackend(fl)
    target = PodTarget(uid="u1", namespace="default", name="web", netns_path=ns.path, ips=("10.5.0.2", "fd00:5::2"))
    assert backend.name == "iptables" and not backend.installed(target)
    backend.apply(target, AMBIENT)
    backend.apply(target, AMBIENT)
    assert backend.installed(target) and backend.check(target, AMBIENT) == []
    ns.run([f"iptables-{fl}", "-t", "nat", "-F", "HEADRACE_AM_PRERT"])
    assert backend.check(target, AMBIENT)
    backend.apply(target, AMBIENT)
    assert backend.check(target, AMBIENT) == []
    backend.remove(target)
    backend.remove(target)
    assert not backend.installed(target)
    v4_only = PodTarget(uid="u2", namespace="default", name="v4", netns_path=ns.path, ips=("10.5.0.3",))
    backend.apply(v4_only, SidecarSpec())
    assert "HEADRACE" not in normalized(ns, fl, 6)
    assert backend.check(v4_only, SidecarSpec()) == []
    gone = PodTarget(uid="u3", namespace="default", name="gone", netns_path="/run/netns/hr-gone-xyz")
    backend.remove(gone)
    with pytest.raises(BackendError, match="does not exist"):
        backend.apply(gone, SidecarSpec())
    with pytest.raises(BackendError, match="invalid pod IP"):
        backend.apply(PodTarget(uid="u4", namespace="d", name="n", netns_path=ns.path, ips=("x",)), SidecarSpec())
    with pytest.raises(BackendError, match="flavour"):
        IptablesBackend("iptc")
