"""The nftables builder's shapes and validation, the listing compare, and the plugin's backend choice."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.plugin import rules_backend
from cni.plugin.netconf import NetConf
from cni.rules import nft_builder, nft_compare, nft_text

net = ipaddress.ip_network


def rules_of(table: nft_text.NftTable, chain: str) -> tuple[str, ...]:
    found = table.chain(chain)
    assert found is not None, chain
    return found.rules


def test_one_table_both_families_every_rule_commented() -> None:
    table = nft_builder.sidecar_table(SidecarSpec(), (6, 4, 4))
    assert table.name == "headrace"
    text = table.render()
    assert "ip saddr 127.0.0.6" in text and "ip6 saddr ::6" in text
    assert "meta nfproto" not in text  # both families: no guard on the jumps
    for chain in table.chains:
        assert all(r.endswith('"') and 'comment "headrace: ' in r for r in chain.rules)


def test_one_family_guards_the_jumps_and_drops_the_other_family() -> None:
    text = nft_builder.ambient_table(AmbientSpec(), (6,)).render()
    assert "meta nfproto ipv6 jump am_prert" in text and "ip daddr" not in text and "ip saddr" not in text


def test_hbone_never_captured() -> None:
    table = nft_builder.sidecar_table(SidecarSpec(exclude_inbound_ports=()), (4,))
    assert rules_of(table, "sc_inbound")[0].startswith("tcp dport 15008 return")
    own = [r for r in rules_of(table, "sc_output") if "own pod ip" in r]
    assert own and all("tcp dport != 15008" in r for r in own)
    included = nft_builder.sidecar_table(SidecarSpec(include_inbound_ports=(15008, 80)), (4,))
    assert [r.split(" jump")[0].split(" return")[0] for r in rules_of(included, "sc_inbound")] == [
        "tcp dport 15008",
        "tcp dport 80",
    ]
    tproxy = nft_builder.sidecar_table(SidecarSpec(interception_mode="TPROXY"), (4,))
    assert any(r.startswith("tcp dport 15008 return") for r in rules_of(tproxy, "sc_tp_inbound"))
    assert all("tcp dport != 15008" in r for r in rules_of(tproxy, "sc_tp_output") if "own pod ip" in r)
    ambient = rules_of(nft_builder.ambient_table(AmbientSpec(), (4,)), "am_prert")
    assert any("tcp dport != 15008" in r and "redirect to :15006" in r for r in ambient)


def test_interfaces_and_included_outbound_ports() -> None:
    spec = SidecarSpec(exclude_interfaces=("net1",), kubevirt_interfaces=("eth1",), include_outbound_ports=(31000,))
    table = nft_builder.sidecar_table(spec, (4, 6))
    assert [r.split(" comment")[0] for r in rules_of(table, "sc_inbound")[:3]] == [
        'iifname "eth1" jump sc_redirect',
        'iifname "eth1" return',
        'iifname "net1" return',
    ]
    out = rules_of(table, "sc_output")
    assert out[0].startswith('oifname "net1" return')
    assert (
        out.index('tcp dport 31000 jump sc_redirect comment "headrace: sidecar included outbound port"') == len(out) - 2
    )
    with pytest.raises(ValueError, match="excludeInterfaces"):
        nft_builder.sidecar_table(SidecarSpec(exclude_interfaces=('eth0" accept',)), (4,))
    kubevirt_tproxy = nft_builder.sidecar_table(
        SidecarSpec(interception_mode="TPROXY", kubevirt_interfaces=("eth1",)), (4,)
    )
    assert kubevirt_tproxy.chain("nat_prerouting") is not None  # the VM's outbound still goes through nat


def test_tproxy_drops_what_no_transparent_listener_takes() -> None:
    rules = rules_of(nft_builder.sidecar_table(SidecarSpec(interception_mode="TPROXY"), (4, 6)), "sc_tproxy")
    assert [r.split(" comment")[0] for r in rules] == [
        "ip daddr != 127.0.0.1 meta l4proto tcp tproxy ip to :15006 meta mark set 0x00000539 accept",
        "ip6 daddr != ::1 meta l4proto tcp tproxy ip6 to :15006 meta mark set 0x00000539 accept",
        "ip daddr != 127.0.0.1 drop",
        "ip6 daddr != ::1 drop",
    ]


def test_include_ranges_of_one_family_capture_nothing_of_the_other() -> None:
    out = rules_of(
        nft_builder.sidecar_table(SidecarSpec(include_outbound_ranges=(net("10.0.0.0/8"),)), (4, 6)), "sc_output"
    )
    captures = [r for r in out if "jump sc_redirect" in r]
    assert [r.split(" jump")[0] for r in captures] == ["ip daddr 10.0.0.0/8"]


def test_transactions() -> None:
    table = nft_builder.ambient_table(AmbientSpec(), (4,))
    replace = nft_text.replace_text(table)
    assert replace.startswith("table inet headrace {}\ndelete table inet headrace\ntable inet headrace {\n")
    assert nft_text.create_text(table).startswith("create table inet headrace\n")
    assert nft_text.remove_text() == "table inet headrace {}\ndelete table inet headrace\n"


@pytest.mark.parametrize(
    ("spec", "families", "match"),
    [
        (SidecarSpec(outbound_port=0), (4,), "outbound proxy port"),
        (SidecarSpec(exclude_inbound_ports=(70000,)), (4,), "excludeInboundPorts"),
        (SidecarSpec(proxy_uid=-1), (4,), "proxy uid"),
        (SidecarSpec(), (5,), "address family"),
        (SidecarSpec(), (), "at least one"),
        (AmbientSpec(mark=0x1000), (4,), "does not fit"),
    ],
)
def test_bad_values_are_refused(spec: SidecarSpec | AmbientSpec, families: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        if isinstance(spec, SidecarSpec):
            nft_builder.sidecar_table(spec, families)
        else:
            nft_builder.ambient_table(spec, families)


def test_node_probe_table_empty_is_none() -> None:
    assert nft_builder.node_probe_table([]) is None
    with pytest.raises(ValueError, match="invalid pod IP"):
        nft_builder.node_probe_table(["10.0.0.300"])


def test_compare_reports_each_difference() -> None:
    table = nft_builder.sidecar_table(SidecarSpec(), (4,))
    listing = table.render()
    assert nft_compare.compare(listing, table) == []
    assert nft_compare.compare(None, table) == ["table inet headrace is missing"]
    redirect = rules_of(table, "sc_redirect")[0]
    assert nft_compare.compare(listing.replace(f"\t\t{redirect}\n", ""), table) == [
        f"table inet headrace: chain sc_redirect: missing rule: {redirect}"
    ]
    doubled = listing.replace(f"\t\t{redirect}\n", f"\t\t{redirect} # handle 4\n\t\t{redirect}\n")
    assert nft_compare.compare(doubled, table) == [
        "table inet headrace: chain sc_redirect: rules out of order or duplicated"
    ]
    extra = listing.replace("}\n", "\n\tchain x {\n\t}\n}\n")
    assert (
        nft_compare.compare(extra[: extra.rindex("}")] + "}\n", table)[-1] == "table inet headrace: unexpected chain x"
    )
    rehooked = listing.replace("priority dstnat", "priority 0")
    assert "hooks type nat hook prerouting priority 0" in nft_compare.compare(rehooked, table)[0]


def test_plugin_picks_nftables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    conf = NetConf("1.0.0", "n", "headrace-cni", backend="auto")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert rules_backend.uses_nftables(conf)  # auto without any iptables binary
    tool = tmp_path / "iptables-nft-restore"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert not rules_backend.uses_nftables(conf)
    assert rules_backend.uses_nftables(NetConf("1.0.0", "n", "headrace-cni", backend="nftables"))
    assert rules_backend.tool_problems(NetConf("1.0.0", "n", "headrace-cni", backend="nftables")) == [
        "nft is not installed (backend nftables)",
        "nsenter is not installed",
    ]
