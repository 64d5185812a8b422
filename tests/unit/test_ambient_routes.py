"""The ambient original-source policy routing as data (golden files), and that it lines up with the ambient
rules' CONNMARK (the mark restored onto the app's replies) and with istio-cni's values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cni.contract.constants import AMBIENT_MARK_MASK
from cni.contract.spec import AmbientSpec
from cni.rules import ambient
from cni.rules import tproxy_routes as tr
from tests.unit.golden import assert_golden

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "routes"


def describe(routing: tr.Routing) -> str:
    """Everything the routing runs, per family: the add, delete and check batches."""
    out = [f"# {routing.name}: pref {routing.pref} fwmark {routing.fwmark} table {routing.table}"]
    for family in (4, 6):
        argv = " ".join(tr.argv(family))
        out.append(f"## IPv{family}: {argv}")
        out += [f"add: {line}" for line in tr.add_lines(family, routing)]
        out += [f"del: {line}" for line in tr.del_lines(family, routing)]
        out += [f"check: {line}" for line in tr.check_lines(routing)]
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("routing", [tr.AMBIENT, tr.TPROXY], ids=lambda r: r.name)
def test_routing_golden(routing: tr.Routing) -> None:
    assert_golden(GOLDEN / f"{routing.name}.golden", describe(routing))


def test_ambient_routing_matches_the_ambient_rules_and_istio() -> None:
    r = tr.AMBIENT
    # istio-cni: ip rule add fwmark 0x111/0xfff pref 32764 lookup 100; ip route add local 0.0.0.0/0 dev lo table 100
    assert (r.pref, r.mark, r.mask, r.table) == (32764, 0x111, 0xFFF, 100)
    assert r.mark == ambient.CONNMARK_PROXY and r.mask == AMBIENT_MARK_MASK
    # the ambient rules set exactly this connmark on the proxy's connections and restore it on replies
    spec = AmbientSpec()
    for family in (4, 6):
        text = "\n".join(line for table in ambient.ambient_rules(spec, family).tables for line in table.rules)
        assert f"--set-xmark {r.fwmark}" in text
        assert re.search(rf"-m connmark --mark {r.fwmark} .*-j CONNMARK --restore-mark", text)
    # no ::6 address for ambient pods; sidecar TPROXY keeps its own distinct priority and table
    assert not [line for line in tr.add_lines(6, r) if line.startswith("addr ")]
    assert (tr.TPROXY.pref, tr.TPROXY.table) != (r.pref, r.table)


def test_ambient_check_problems() -> None:
    good4 = "32764:\tfrom all fwmark 0x111/0xfff lookup 100\nlocal default dev lo scope host \n"
    assert tr.check_problems(4, good4, tr.AMBIENT) == []
    good6 = "32764:\tfrom all fwmark 0x111/0xfff lookup 100\nlocal default dev lo metric 1024 pref medium\n"
    assert tr.check_problems(6, good6, tr.AMBIENT) == []
    assert tr.check_problems(4, "local default dev lo scope host\n", tr.AMBIENT) == [
        "IPv4 policy routing: ip rule 'pref 32764 fwmark 0x111/0xfff lookup 100' is missing"
    ]
    # a rule without the mask (or the TPROXY one) is not ours
    assert len(tr.check_problems(4, "32764:\tfrom all fwmark 0x111 lookup 100\n", tr.AMBIENT)) == 2
    assert tr.check_problems(4, "32764:\tfrom all fwmark 0x111/0xfff lookup 100\n", tr.AMBIENT) == [
        "IPv4 policy routing: route 'local default dev lo' in table 100 is missing"
    ]
