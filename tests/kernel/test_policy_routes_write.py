"""The in-process policy-routing writer (rtnetlink) on a real netns: what it adds is what `ip rule add` /
`ip route add local default dev lo table T` add (read back by `ip` and by the in-process reader), an add
that meets existing entries creates nothing (so its rollback deletes nothing that was there), a refusal
midway takes back what went in, and deletes of absent entries are fine."""

from __future__ import annotations

import errno

import pytest
from node_agent.kernel import policy_routes_write as prw
from node_agent.kernel.policy_routes_read import check_routing

from cni.kernel.netns import entered
from cni.rules import tproxy_routes
from cni.rules.tproxy_routes import AMBIENT, TPROXY, Routing
from tests.harness.netns import NetNS

pytestmark = pytest.mark.kernel


def ip_view(ns: NetNS, routing: Routing) -> list[str]:
    """Our rule and route lines of both families as `ip` prints them."""
    out: list[str] = []
    for family in (4, 6):
        rules = ns.run(["ip", f"-{family}", "rule", "list", "pref", str(routing.pref)]).stdout
        routes = ns.run(["ip", f"-{family}", "route", "list", "table", str(routing.table)], check=False).stdout
        out += [f"v{family} {line.strip()}" for line in (rules + routes).splitlines() if line.strip()]
    return out


@pytest.mark.parametrize("routing", [AMBIENT, TPROXY], ids=["ambient", "tproxy"])
def test_in_process_routing_matches_ip(ns: NetNS, routing: Routing) -> None:
    with entered(ns.path):
        created = prw.add_here((4, 6), routing)
    assert len(created) == 4
    assert check_routing(ns.path, (4, 6), routing) == []
    # the same entries `ip` makes: ip's own check finds them, and ip's add meets them (EEXIST)
    for family in (4, 6):
        shown = ns.run(["ip", f"-{family}", "-force", "-batch", "-"],
                       input=tproxy_routes.batch_text(tproxy_routes.check_lines(routing))).stdout
        assert tproxy_routes.check_problems(family, shown, routing) == []
        added = ns.run(["ip", f"-{family}", "-force", "-batch", "-"], check=False,
                       input=tproxy_routes.batch_text(tproxy_routes.add_lines(family, routing)[-2:]))
        assert tproxy_routes.failures(added.stderr) == {1: "RTNETLINK answers: File exists",
                                                        2: "RTNETLINK answers: File exists"}, added.stderr
    view = ip_view(ns, routing)
    assert len(view) == 4, view
    with entered(ns.path):
        assert prw.add_here((4, 6), routing) == []  # all there: nothing created, nothing to roll back
        prw.delete_here([], routing)
        prw.remove_here((4, 6), routing)
        prw.remove_here((4, 6), routing)  # absent is fine
    assert ip_view(ns, routing) == []
    assert len(check_routing(ns.path, (4, 6), routing)) == 4


def test_a_refusal_midway_takes_back_what_went_in(ns: NetNS) -> None:
    ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")
    ns.sysctl("net.ipv6.conf.lo.disable_ipv6", "1")
    bad = Routing("bad-routes", 32000, 0x77, 4_000_000_000)  # a table id above 255 (sent as FRA_TABLE)
    with entered(ns.path):
        created = prw.add_here((4,), bad)
        assert [e.kind for e in created] == ["rule", "route"]
        prw.delete_here(created, bad)
    assert ip_view(ns, bad) == []
    # IPv6 route on a netns whose lo has IPv6 off: the kernel refuses it; the rules that went in are gone
    with entered(ns.path), pytest.raises(OSError) as err:
        prw.add_here((4, 6), bad)
    assert err.value.errno not in (0, errno.EEXIST)
    assert "IPv6 route" in str(err.value)
    assert ip_view(ns, bad) == []
