"""The CNI ADD fast path of netns_tables.apply_sidecar(optimistic=True), on both flavours:

- a fresh netns gets the rules in one restore per family (`-N` creates our chains), and the result is
  exactly what the save → transition → restore path gives;
- a second ADD meets our chains: `-N` makes the optimistic restore fail atomically, the regular path
  replaces them, and there is still one set;
- if v6 fails after v4 went in optimistically, v4 is rolled back to "nothing of ours";
- if adding ::6 to lo fails (it runs in parallel with the restores), the rules that went in are rolled back.
"""

from __future__ import annotations

import ipaddress

import pytest

from cni.contract.sidecar_params import SidecarParams
from cni.contract.spec import SidecarSpec
from cni.kernel import flavour, iptables_run, side_jobs, spawn
from cni.kernel import tables as netns_tables
from tests.harness.netns import NetNS

pytestmark = pytest.mark.kernel

FLAVOURS = ["legacy", "nft"]
SPEC = SidecarSpec(
    exclude_outbound_ports=(5432,),
    exclude_outbound_ranges=(ipaddress.ip_network("10.96.0.0/12"), ipaddress.ip_network("fd00:96::/64")),
)
FOREIGN = "*nat\n:FOREIGN_NAT - [0:0]\n-A OUTPUT -j FOREIGN_NAT\n-A PREROUTING -p udp -j FOREIGN_NAT\nCOMMIT\n"


def rules(n: NetNS, fl: str, family: int) -> list[str]:
    """Rule and chain lines of the save output (no comments, no counters)."""
    text = iptables_run.save(n.path, fl, family)  # type: ignore[arg-type]
    return [line.split(" [")[0] for line in text.splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize("fl", FLAVOURS)
def test_fresh_netns_gets_the_same_rules_as_the_regular_path(fl: str) -> None:
    a, b = NetNS.create("hropt-"), NetNS.create("hropt-")
    try:
        for n in (a, b):
            for family in (4, 6):
                n.run([flavour.binary(fl, family, "restore"), "--noflush"], input=FOREIGN)  # type: ignore[arg-type]
        netns_tables.apply_sidecar(a.path, SPEC, (4, 6), fl, optimistic=True)  # type: ignore[arg-type]
        netns_tables.apply_sidecar(b.path, SPEC, (4, 6), fl)  # type: ignore[arg-type]
        for family in (4, 6):
            assert rules(a, fl, family) == rules(b, fl, family)
        assert netns_tables.check_sidecar(a.path, SPEC, (4, 6), fl) == []  # type: ignore[arg-type]
        assert "inet6 ::6/128" in a.run(["ip", "-6", "addr", "show", "dev", "lo"]).stdout
    finally:
        a.delete()
        b.delete()


@pytest.mark.parametrize("fl", FLAVOURS)
def test_add_twice_is_one_set_and_replaces(ns: NetNS, fl: str) -> None:
    netns_tables.apply_sidecar(ns.path, SidecarParams(), (4, 6), fl, optimistic=True)  # type: ignore[arg-type]
    netns_tables.apply_sidecar(ns.path, SPEC, (4, 6), fl, optimistic=True)  # type: ignore[arg-type]
    netns_tables.apply_sidecar(ns.path, SPEC, (4, 6), fl, optimistic=True)  # type: ignore[arg-type]
    assert netns_tables.check_sidecar(ns.path, SPEC, (4, 6), fl) == []  # type: ignore[arg-type]
    for family in (4, 6):
        lines = [line for line in rules(ns, fl, family) if "HEADRACE_" in line]
        assert len(lines) == len(set(lines))


@pytest.mark.parametrize("fl", FLAVOURS)
def test_v6_failure_rolls_back_an_optimistic_v4(ns: NetNS, fl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ns.run([flavour.binary(fl, 4, "restore"), "--noflush"], input=FOREIGN)  # type: ignore[arg-type]
    before = rules(ns, fl, 4)
    real = flavour.binary

    def broken_v6_restore(fla: str, family: int, tool: str) -> str:
        return "ip6tables-headrace-missing" if (family, tool) == (6, "restore") else real(fla, family, tool)  # type: ignore[arg-type]

    monkeypatch.setattr(iptables_run, "binary", broken_v6_restore)
    with pytest.raises(iptables_run.IptablesError) as err:
        netns_tables.apply_sidecar(ns.path, SPEC, (4, 6), fl, optimistic=True)  # type: ignore[arg-type]
    assert err.value.step == "apply-sidecar-v6" and "ip6tables-headrace-missing" in err.value.stderr
    assert rules(ns, fl, 4) == before
    assert not [line for line in rules(ns, fl, 6) if "HEADRACE_" in line]


@pytest.mark.parametrize("fl", FLAVOURS)
@pytest.mark.parametrize("optimistic", [True, False])
def test_lo_address_failure_rolls_the_rules_back(
    ns: NetNS, fl: str, optimistic: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {family: rules(ns, fl, family) for family in (4, 6)}
    real_argv = iptables_run.netns_argv

    def failing_ip(netns_path: str | None, argv: list[str]) -> list[str]:
        return real_argv(netns_path, ["false", *argv[1:]] if argv[0] == "ip" else argv)

    monkeypatch.setattr(side_jobs, "netns_argv", failing_ip)
    with pytest.raises(iptables_run.IptablesError) as err:
        netns_tables.apply_sidecar(ns.path, SPEC, (4, 6), fl, optimistic=optimistic)  # type: ignore[arg-type]
    assert err.value.step == "lo-v6"
    for family in (4, 6):
        assert not [line for line in rules(ns, fl, family) if "HEADRACE_" in line]
        assert not before[family] or rules(ns, fl, family) == before[family]


@pytest.mark.parametrize("fl", FLAVOURS)
def test_reapplying_the_same_rules_runs_no_replace_restore(ns: NetNS, fl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our rules already exactly as wanted (the builder's text is iptables-save canonical): the second
    ADD's optimistic attempt is refused by -N and the regular path finds nothing to change, so no
    replacing restore runs."""
    netns_tables.apply_sidecar(ns.path, SPEC, (4, 6), fl, optimistic=True)  # type: ignore[arg-type]
    before = {family: rules(ns, fl, family) for family in (4, 6)}
    batches: list[list[list[str]]] = []
    real = spawn.run_many

    def spy(jobs: list[tuple[list[str], str | None]], timeout: float) -> list[spawn.Result]:
        batches.append([list(argv) for argv, _ in jobs])
        return real(jobs, timeout)

    monkeypatch.setattr(spawn, "run_many", spy)
    netns_tables.apply_sidecar(ns.path, SPEC, (4, 6), fl, optimistic=True)  # type: ignore[arg-type]
    restores = [argv for batch in batches for argv in batch if any(a.endswith("-restore") for a in argv)]
    assert len(restores) == 2  # the two -N attempts, refused
    batches.clear()
    netns_tables.apply_sidecar(ns.path, SPEC, (4, 6), fl)  # type: ignore[arg-type]
    assert not [argv for batch in batches for argv in batch if any(a.endswith("-restore") for a in argv)]
    assert {family: rules(ns, fl, family) for family in (4, 6)} == before
    assert netns_tables.check_sidecar(ns.path, SPEC, (4, 6), fl) == []  # type: ignore[arg-type]
