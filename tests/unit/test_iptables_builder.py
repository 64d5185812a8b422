"""The pure rule builder: validation, family handling and the rule shapes the kernel tests rely on."""

from __future__ import annotations

import ipaddress
import re
import shlex

import pytest

from cni.contract.kinds import Family
from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.rules import builder, rule_text

net = ipaddress.ip_network


def _nat(rs: builder.RuleSet) -> builder.TableRules:
    t = rs.table("nat")
    assert t is not None
    return t


def _bare(lines: tuple[str, ...] | list[str]) -> list[str]:
    """The rules without their purpose comment (the shape tests below look at matches and targets)."""
    return [re.sub(r' -m comment --comment "headrace: [^"]*"', "", line) for line in lines]


def _all_rule_sets() -> list[builder.RuleSet]:
    families: tuple[Family, ...] = (4, 6)
    specs = [
        SidecarSpec(exclude_inbound_ports=(22,), exclude_outbound_ranges=(net("10.0.0.0/8"), net("fd00::/8"))),
        SidecarSpec(include_inbound_ports=(80,), include_outbound_ranges=(net("10.0.0.0/8"), net("fd00::/8"))),
        SidecarSpec(interception_mode="TPROXY", exclude_outbound_ports=(5432,)),
        SidecarSpec(interception_mode="TPROXY", include_inbound_ports=(80,)),
    ]
    out = [builder.sidecar_rules(spec, f) for spec in specs for f in families]
    out += [builder.ambient_rules(AmbientSpec(capture_dns=True, exclude_outbound_ports=(9,)), f) for f in families]
    out += [builder.node_probe_rules(["10.0.0.1", "fd00::1"], f) for f in families]
    return out


def test_every_rule_names_its_purpose_right_before_its_target() -> None:
    pattern = re.compile(r'^-A \S+ .*-m comment --comment "headrace: [a-z0-9 ()-]+" -[jg] \S+( .*)?$')
    for rs in _all_rule_sets():
        for t in rs.tables:
            for line in (*t.jumps, *t.rules):
                assert pattern.match(line), line
                assert line.count("-m comment") == 1


def test_comment_is_canonical_and_rejects_what_iptables_save_would_escape() -> None:
    assert builder.comment("skip proxy uid") == '-m comment --comment "headrace: skip proxy uid"'
    for bad in ("", 'say "hi"', "it's", "back\\slash", "new\nline", "x" * 250):
        with pytest.raises(ValueError, match="purpose"):
            builder.comment(bad)


def test_all_chains_are_ours_and_short_enough() -> None:
    for rs in (
        builder.sidecar_rules(SidecarSpec(), 4),
        builder.ambient_rules(AmbientSpec(), 6),
        builder.node_probe_rules(["10.0.0.1"], 4),
    ):
        for t in rs.tables:
            for chain in t.chains:
                assert chain.startswith(rs.owner_prefix)
                assert chain.startswith(builder.OWNED_PREFIX)
                assert len(chain) <= 28  # XT_EXTENSION_MAXNAMELEN - 1
            for line in (*t.jumps, *t.rules):
                assert line.startswith("-A ")
                assert "  " not in line and not line.endswith(" ")


def test_sidecar_and_ambient_chain_names_are_distinct() -> None:
    sc = {c for t in builder.sidecar_rules(SidecarSpec(), 4).tables for c in t.chains}
    am = {c for t in builder.ambient_rules(AmbientSpec(), 4).tables for c in t.chains}
    assert not sc & am


def test_sidecar_health_ports_always_excluded() -> None:
    rules = _bare(_nat(builder.sidecar_rules(SidecarSpec(exclude_inbound_ports=(22,)), 4)).rules)
    for port in (15020, 15021, 15090, 22):
        assert f"-A HEADRACE_SC_INBOUND -p tcp -m tcp --dport {port} -j RETURN" in rules


def test_sidecar_include_inbound_only_listed_ports() -> None:
    t = _nat(builder.sidecar_rules(SidecarSpec(include_inbound_ports=(80, 80, 8080)), 4))
    inbound = _bare([r for r in t.rules if r.startswith("-A HEADRACE_SC_INBOUND ")])
    assert inbound == [
        "-A HEADRACE_SC_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",  # HBONE first, as istio-iptables
        "-A HEADRACE_SC_INBOUND -p tcp -m tcp --dport 80 -j HEADRACE_SC_IN_REDIRECT",
        "-A HEADRACE_SC_INBOUND -p tcp -m tcp --dport 8080 -j HEADRACE_SC_IN_REDIRECT",
    ]


def test_sidecar_hbone_never_captured() -> None:
    specs = (SidecarSpec(), SidecarSpec(include_inbound_ports=(15008, 80)), SidecarSpec(interception_mode="TPROXY"))
    for spec in specs:
        for fam in (4, 6):
            rs = builder.sidecar_rules(spec, fam)
            table = rs.table("mangle") if spec.interception_mode == "TPROXY" else rs.table("nat")
            assert table is not None
            inbound = _bare([r for r in table.rules if r.startswith("-A HEADRACE_SC_INBOUND ")])
            assert "-A HEADRACE_SC_INBOUND -p tcp -m tcp --dport 15008 -j RETURN" in inbound
            assert not any("--dport 15008 -j HEADRACE_SC_IN_REDIRECT" in r for r in inbound)
            own = [r for t in rs.tables for r in t.rules if "own pod ip" in r]
            assert own and all("-m tcp ! --dport 15008 -m owner" in r for r in own)


def test_sidecar_bad_interface_names_rejected() -> None:
    for bad in ("", "1eth", "eth 0", "e" * 16, "eth;id"):
        with pytest.raises(ValueError, match="not an interface name"):
            builder.sidecar_rules(SidecarSpec(exclude_interfaces=(bad,)), 4)
        with pytest.raises(ValueError, match="not an interface name"):
            builder.sidecar_rules(SidecarSpec(kubevirt_interfaces=(bad,)), 4)


def test_sidecar_empty_include_means_no_inbound_capture() -> None:
    t = _nat(builder.sidecar_rules(SidecarSpec(include_inbound_ports=()), 4))
    assert not any(j.startswith("-A PREROUTING") for j in t.jumps)


def test_sidecar_include_ranges_per_family() -> None:
    spec = SidecarSpec(include_outbound_ranges=(net("10.0.0.0/8"),))
    v4 = _bare(_nat(builder.sidecar_rules(spec, 4)).rules)
    v6 = _bare(_nat(builder.sidecar_rules(spec, 6)).rules)
    assert "-A HEADRACE_SC_OUTPUT -d 10.0.0.0/8 -j HEADRACE_SC_REDIRECT" in v4
    assert not any(r.endswith("-j HEADRACE_SC_REDIRECT") and "SC_OUTPUT" in r for r in v6)


def test_sidecar_v6_uses_v6_loopback_and_passthrough() -> None:
    rules = _bare(_nat(builder.sidecar_rules(SidecarSpec(), 6)).rules)
    assert "-A HEADRACE_SC_OUTPUT -s ::6/128 -o lo -j RETURN" in rules
    assert "-A HEADRACE_SC_OUTPUT -d ::1/128 -j RETURN" in rules
    assert not any("127.0.0" in r for r in rules)


def test_ambient_dns_only_when_enabled() -> None:
    off = _nat(builder.ambient_rules(AmbientSpec(), 4)).rules
    on = _nat(builder.ambient_rules(AmbientSpec(capture_dns=True), 4)).rules
    assert not any("15053" in r for r in off)
    assert sum("--to-ports 15053" in r for r in on) == 2  # udp and tcp


def test_ambient_custom_mark_and_probe() -> None:
    spec = AmbientSpec(mark=0x2, mark_mask=0xF, probe_snat_v4=ipaddress.IPv4Address("169.254.9.9"))
    rs = builder.ambient_rules(spec, 4)
    text = rs.render()
    assert "--mark 0x2/0xf" in text and "169.254.9.9/32" in text
    assert "--set-xmark 0x1/0xf" in text  # 0x111 & 0xf


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (SidecarSpec(outbound_port=0), "port must be"),
        (SidecarSpec(inbound_port=70000), "port must be"),
        (SidecarSpec(exclude_outbound_ports=(True,)), "excludeOutboundPorts"),
        (SidecarSpec(exclude_inbound_ports=("80",)), "excludeInboundPorts"),  # type: ignore[arg-type]
        (SidecarSpec(include_inbound_ports=(-1,)), "includeInboundPorts"),
        (SidecarSpec(proxy_uid=-5), "proxy uid"),
        (SidecarSpec(exclude_outbound_ranges=("10.0.0.0/8",)), "IP network"),  # type: ignore[arg-type]
    ],
)
def test_sidecar_validation(spec: SidecarSpec, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        builder.sidecar_rules(spec, 4)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (AmbientSpec(mark=0x1539), "does not fit"),
        (AmbientSpec(mark_mask=0), "does not fit"),
        (AmbientSpec(hbone_port=0), "HBONE"),
        (AmbientSpec(probe_snat_v4=ipaddress.IPv6Address("::1")), "probe source"),  # type: ignore[arg-type]
    ],
)
def test_ambient_validation(spec: AmbientSpec, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        builder.ambient_rules(spec, 4)


@pytest.mark.parametrize("family", [0, 5, "4", None])
def test_bad_family(family: object) -> None:
    with pytest.raises(ValueError, match="family"):
        builder.sidecar_rules(SidecarSpec(), family)  # type: ignore[arg-type]


def test_node_probe_rules_filter_sort_dedup() -> None:
    rs = builder.node_probe_rules(["10.0.0.9", "10.0.0.10", "10.0.0.9", "fd00::1"], 4)
    t = _nat(rs)
    assert [r.split()[3] for r in t.rules] == ["10.0.0.9/32", "10.0.0.10/32"]
    assert t.jumps == ('-A POSTROUTING -m comment --comment "headrace: node probe snat" -j HEADRACE_POSTROUTING',)
    v6 = _nat(builder.node_probe_rules(["10.0.0.9", "fd00::1"], 6)).rules
    assert v6 == (
        "-A HEADRACE_POSTROUTING -d fd00::1/128 -p tcp -m owner --socket-exists "
        '-m comment --comment "headrace: snat kubelet probe" '
        "-j SNAT --to-source fd16:9254:7127:1337:ffff:ffff:ffff:ffff",
    )


@pytest.mark.parametrize("bad", ["10.0.0.300", "10.0.0.1; rm -rf /", "", "10.0.0.0/24", 7])
def test_node_probe_rejects_bad_ips(bad: object) -> None:
    with pytest.raises(ValueError, match="pod IP"):
        builder.node_probe_rules([bad], 4)


# ---------------------------------------------------------------- TPROXY inbound mode

TPROXY = SidecarSpec(interception_mode="TPROXY")


def test_tproxy_chains_are_ours_and_short_enough() -> None:
    rs = builder.sidecar_rules(TPROXY, 4)
    assert [t.table for t in rs.tables] == ["mangle", "nat"]
    for t in rs.tables:
        for chain in t.chains:
            assert chain.startswith(builder.SIDECAR_PREFIX) and len(chain) <= 28
        for line in (*t.jumps, *t.rules):
            assert line.startswith("-A ") and "  " not in line and not line.endswith(" ")
        # every rule of ours lives in a chain of ours; built-in chains only get jumps into ours
        assert all(r.split()[1].startswith(builder.SIDECAR_PREFIX) for r in t.rules)
        assert all(j.split()[-1].startswith(builder.SIDECAR_PREFIX) for j in t.jumps)


@pytest.mark.parametrize("family", [4, 6])
def test_tproxy_nat_is_the_outbound_part_of_redirect_mode(family: Family) -> None:
    redirect = _nat(builder.sidecar_rules(SidecarSpec(), family))
    tproxy = _nat(builder.sidecar_rules(TPROXY, family))
    assert builder.SC_INBOUND not in tproxy.chains
    assert tproxy.jumps == tuple(j for j in redirect.jumps if not j.startswith("-A PREROUTING"))
    assert tproxy.rules == tuple(r for r in redirect.rules if not r.startswith(f"-A {builder.SC_INBOUND} "))


@pytest.mark.parametrize("family", [4, 6])
def test_tproxy_mangle_rules(family: Family) -> None:
    mangle = builder.sidecar_rules(TPROXY, family).table("mangle")
    assert mangle is not None
    any_ip, lo, passthrough = (
        ("0.0.0.0", "127.0.0.1/32", "127.0.0.6/32") if family == 4 else ("::", "::1/128", "::6/128")
    )
    tproxy = (
        f"-A HEADRACE_SC_TPROXY ! -d {lo} -p tcp -j TPROXY --on-port 15006 --on-ip {any_ip} "
        "--tproxy-mark 0x539/0xffffffff"
    )
    assert tproxy in _bare(mangle.rules)
    inbound = _bare([r for r in mangle.rules if r.startswith("-A HEADRACE_SC_INBOUND ")])
    assert inbound[:3] == [
        "-A HEADRACE_SC_INBOUND -p tcp -m mark --mark 0x539 -j RETURN",
        f"-A HEADRACE_SC_INBOUND -s {passthrough} -i lo -p tcp -j RETURN",
        "-A HEADRACE_SC_INBOUND -i lo -p tcp -m mark ! --mark 0x53a -j RETURN",
    ]
    # HBONE and the contract's excluded ports return before established connections are diverted
    assert inbound[3:] == [
        *(f"-A HEADRACE_SC_INBOUND -p tcp -m tcp --dport {p} -j RETURN" for p in (15008, 15020, 15021, 15090)),
        "-A HEADRACE_SC_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j HEADRACE_SC_DIVERT",
        "-A HEADRACE_SC_INBOUND -p tcp -j HEADRACE_SC_TPROXY",
    ]
    assert _bare(mangle.jumps) == [
        "-A PREROUTING -p tcp -j HEADRACE_SC_PRERT",
        "-A OUTPUT -p tcp -j HEADRACE_SC_OUTPUT",
    ]


def test_tproxy_include_inbound_ports_divert_and_tproxy_per_port() -> None:
    mangle = builder.sidecar_rules(SidecarSpec(interception_mode="TPROXY", include_inbound_ports=(80,)), 4).table(
        "mangle"
    )
    assert mangle is not None
    inbound = _bare([r for r in mangle.rules if r.startswith("-A HEADRACE_SC_INBOUND ")][3:])
    assert inbound == [
        "-A HEADRACE_SC_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
        "-A HEADRACE_SC_INBOUND -p tcp -m tcp --dport 80 -m conntrack --ctstate RELATED,ESTABLISHED "
        "-j HEADRACE_SC_DIVERT",
        "-A HEADRACE_SC_INBOUND -p tcp -m tcp --dport 80 -j HEADRACE_SC_TPROXY",
    ]


def test_tproxy_without_inbound_capture_is_redirect_mode() -> None:
    spec = SidecarSpec(interception_mode="TPROXY", include_inbound_ports=())
    assert not builder.uses_tproxy(spec)
    families: tuple[Family, ...] = (4, 6)
    for family in families:
        assert builder.sidecar_rules(spec, family) == builder.sidecar_rules(
            SidecarSpec(include_inbound_ports=()), family
        )


def test_uses_tproxy_and_bad_mode() -> None:
    assert builder.uses_tproxy(TPROXY) and not builder.uses_tproxy(SidecarSpec())
    with pytest.raises(ValueError, match="interception mode"):
        builder.sidecar_rules(SidecarSpec(interception_mode="NONE"), 4)  # type: ignore[arg-type]


def test_in_if_is_placed_where_iptables_save_puts_it() -> None:
    line = builder.rule("C", src="1.2.3.4/32", dst="5.6.7.8/32", in_if="lo", proto="tcp", purpose="p", target="RETURN")
    assert line == '-A C -s 1.2.3.4/32 -d 5.6.7.8/32 -i lo -p tcp -m comment --comment "headrace: p" -j RETURN'


def test_arguments_split_saved_lines_like_iptables_restore() -> None:
    for rs in _all_rule_sets():
        for t in rs.tables:
            for line in (*t.jumps, *t.rules):
                assert rule_text.arguments(line) == shlex.split(line), line
    # iptables-save's escapes inside a quoted comment: \" \\ \' (each the character itself)
    saved = r'-A X -m comment --comment "say \"hi\" c:\\ it\'s" -j RETURN'
    assert rule_text.arguments(saved) == [
        "-A",
        "X",
        "-m",
        "comment",
        "--comment",
        'say "hi" c:\\ it\'s',
        "-j",
        "RETURN",
    ]
    assert rule_text.arguments(" -A\tX  -j Y \n") == ["-A", "X", "-j", "Y"]
    assert rule_text.arguments('-A X --comment "" -j Y') == ["-A", "X", "--comment", "", "-j", "Y"]
    assert rule_text.arguments("-A X --comment 'b c' -j Y") == ["-A", "X", "--comment", "'b", "c'", "-j", "Y"]


def test_sidecar_rules_are_built_once_per_spec_and_family() -> None:
    """The agent applies and checks the same few specs for every pod: a spec and family built before give
    the same (immutable) ruleset back; an equal spec finds it too, another family or spec does not."""
    spec = SidecarSpec(exclude_outbound_ports=(5433,))
    first = builder.sidecar_rules(spec, 4)
    assert builder.sidecar_rules(SidecarSpec(exclude_outbound_ports=(5433,)), 4) is first
    assert builder.sidecar_rules(spec, 6) is not first and builder.sidecar_rules(spec, 6).family == 6
    assert builder.sidecar_rules(SidecarSpec(exclude_outbound_ports=(5434,)), 4) != first


def test_an_unhashable_spec_is_built_not_remembered() -> None:
    spec = SidecarSpec(exclude_outbound_ports=[5435])  # type: ignore[arg-type]
    assert builder.sidecar_rules(spec, 4) == builder.sidecar_rules(SidecarSpec(exclude_outbound_ports=(5435,)), 4)
