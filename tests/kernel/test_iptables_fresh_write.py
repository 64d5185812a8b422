"""The agent's in-process iptables writes of an ADD's sidecar rules against the real iptables-restore on
the real kernel, legacy (`xt_fresh_write`) and nft (`nft_fresh_write`):

- for every REDIRECT-mode sidecar scenario and both families, the table written is the one
  iptables-restore writes from the same text: legacy byte for byte (entries, hooks, underflows; counters
  and the kernel's own bookkeeping aside), nft expression for expression (`nft --debug=netlink list
  ruleset`, handles aside), and iptables-save prints the same rules;
- they decline, changing nothing, whatever they do not lay out themselves (TPROXY mode's mangle rules),
  a table that is not as a new netns holds it (legacy: a rule of someone else, a DROP policy, our chains
  already there; nft: any `nat` table of that family), and (legacy) a held xtables lock; the text then
  goes to iptables-restore as before;
- the rules they write redirect real traffic (outbound TCP lands on 15001 with its original destination,
  inbound on 15006);
- the way back (legacy): a table still exactly our write gets a new netns' empty chains back in-process
  (the agent's removal of such a pod starts no process, an ambient pod's policy routing going over
  rtnetlink); a table someone changed is declined, unchanged, and left to iptables-restore.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from node_agent.backends.base import PodTarget
from node_agent.backends.iptables.backend import IptablesBackend
from node_agent.backends.iptables.in_process_commands import IN_PROCESS, RESTORES
from node_agent.backends.iptables.iptc_fingerprint import LAYOUTS
from node_agent.backends.iptables.nft_fresh_write import restore_fresh_nft_here
from node_agent.backends.iptables.xt_blob import pristine
from node_agent.backends.iptables.xt_digest import masked, read_table
from node_agent.backends.iptables.xt_fresh_write import restore_fresh_here, unrestore_fresh_here
from node_agent.kernel.netns_spawn import InNetnsSpawner
from node_agent.lab.simnode import SimNode

from cni.contract.spec import AmbientSpec, SidecarSpec
from cni.kernel import spawn
from cni.kernel.netns import entered
from cni.rules import builder
from cni.rules.transition import fresh_ruleset_text
from tests.harness.bare_netns import ambient_routing, make_netns
from tests.harness.traffic import sidecar_redirected
from tests.kernel.test_nft_generation import fresh_write

pytestmark = pytest.mark.kernel
net = ipaddress.ip_network

SPECS = {
    "default": SidecarSpec(),
    "exclude-inbound": SidecarSpec(exclude_inbound_ports=(22, 9000)),
    "include-inbound": SidecarSpec(include_inbound_ports=(80, 8080)),
    "no-inbound": SidecarSpec(include_inbound_ports=()),
    "exclude-outbound": SidecarSpec(
        exclude_outbound_ports=(5432, 6379),
        exclude_outbound_ranges=(net("10.96.0.0/12"), net("192.168.0.0/16"), net("fd00:10:96::/112")),
    ),
    "include-ranges": SidecarSpec(include_outbound_ranges=(net("10.0.0.0/8"), net("fd00::/8")),
                                  exclude_outbound_ranges=(net("10.1.0.0/16"),)),
    "include-outbound-ports": SidecarSpec(include_outbound_ports=(31000, 32000), include_outbound_ranges=()),
    "exclude-interfaces": SidecarSpec(exclude_interfaces=("net1", "eth9")),
    "kubevirt": SidecarSpec(kubevirt_interfaces=("eth1", "eth2")),
}


AMBIENT = {
    "ambient-default": AmbientSpec(),
    "ambient-dns": AmbientSpec(capture_dns=True),
    "ambient-exclusions": AmbientSpec(exclude_inbound_ports=(9000,), exclude_outbound_ports=(5432,),
                                      exclude_outbound_ranges=(net("10.96.0.0/12"), net("fd00:10:96::/112"))),
}


def text_of(spec: SidecarSpec | AmbientSpec, family: int) -> str:
    if isinstance(spec, AmbientSpec):
        return fresh_ruleset_text(builder.ambient_rules(spec, family))  # type: ignore[arg-type]
    return fresh_ruleset_text(builder.sidecar_rules(spec, family))  # type: ignore[arg-type]


def tool(family: int, what: str, flavour: str = "legacy") -> str:
    return f"{'iptables' if family == 4 else 'ip6tables'}-{flavour}-{what}"


def restore(name: str, family: int, text: str, flavour: str = "legacy") -> None:
    subprocess.run(["ip", "netns", "exec", name, tool(family, "restore", flavour), "--noflush"], input=text,
                   text=True, check=True, capture_output=True)


def saved(name: str, family: int, flavour: str = "legacy") -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", name, tool(family, "save", flavour)], capture_output=True,
                         text=True, check=True).stdout
    return [line for line in out.splitlines() if not line.startswith("#")]


def nft_ruleset(name: str) -> list[str]:
    """`nft --debug=netlink list ruleset`: each rule's expressions (handles taken off), then the listing."""
    out = subprocess.run(["ip", "netns", "exec", name, "nft", "--debug=netlink", "list", "ruleset"],
                         capture_output=True, text=True, check=True).stdout
    lines = []
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] in ("ip", "ip6") and all(w.isdigit() for w in words[3:]):
            line = " ".join(words[:3])  # "ip nat CHAIN <handle> [<previous handle>]"
        lines.append(line)
    return lines


def table_blob(name: str, family: int, table: str = "nat") -> tuple[bytes, bytes]:
    with entered(f"/run/netns/{name}"):
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        with socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
            info, entries = read_table(sock, family, table)
    return info, masked(entries, LAYOUTS[family], comefrom=True)


def fresh_here(name: str, family: int, text: str, flavour: str = "legacy") -> str | None:
    with entered(f"/run/netns/{name}"):
        return (restore_fresh_here if flavour == "legacy" else restore_fresh_nft_here)(family, text)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("scenario", [*SPECS, *AMBIENT])
def test_the_same_legacy_table_as_iptables_restore(two: tuple[str, str], scenario: str, family: int) -> None:
    real, ours = two
    spec = SPECS.get(scenario) or AMBIENT[scenario]
    text = text_of(spec, family)
    restore(real, family, text)
    assert fresh_here(ours, family, text) is None
    for table in ("nat", "mangle") if scenario in AMBIENT else ("nat",):
        assert table_blob(ours, family, table) == table_blob(real, family, table)
    assert saved(ours, family) == saved(real, family)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("scenario", [*SPECS, *AMBIENT])
def test_the_same_nft_table_as_iptables_nft_restore(two: tuple[str, str], scenario: str, family: int) -> None:
    real, ours = two
    text = text_of(SPECS.get(scenario) or AMBIENT[scenario], family)
    restore(real, family, text, "nft")
    assert fresh_here(ours, family, text, "nft") is None
    assert nft_ruleset(ours) == nft_ruleset(real)
    assert saved(ours, family, "nft") == saved(real, family, "nft")


@pytest.mark.parametrize("flavour", ["legacy", "nft"])
def test_declines_what_it_does_not_lay_out_and_changes_nothing(two: tuple[str, str], flavour: str) -> None:
    name, _ = two
    tproxy = text_of(SidecarSpec(interception_mode="TPROXY"), 4)
    assert "in-process" in (fresh_here(name, 4, tproxy, flavour) or "")
    mark = "*nat\n-N HRX\n-A HRX -j MARK --set-mark 1\nCOMMIT\n"
    assert "in-process" in (fresh_here(name, 4, mark, flavour) or "")
    listed = subprocess.run(["ip", "netns", "exec", name, "cat", "/proc/net/ip_tables_names"], capture_output=True,
                            text=True, check=True).stdout
    assert listed.strip() == ""  # not even a table looked at
    assert nft_ruleset(name) == []


@pytest.mark.parametrize("family", [4, 6])
def test_nft_declines_a_table_that_exists(two: tuple[str, str], family: int) -> None:
    name, _ = two
    text = text_of(SidecarSpec(), family)
    restore(name, family, "*nat\n-A POSTROUTING -p udp -j ACCEPT\nCOMMIT\n", "nft")  # someone else's rule
    before = nft_ruleset(name)
    assert fresh_here(name, family, text, "nft") == "table nat exists"
    assert nft_ruleset(name) == before
    restore(name, family, text, "nft")  # iptables-nft-restore puts ours beside it
    lines = saved(name, family, "nft")
    assert "-A POSTROUTING -p udp -j ACCEPT" in lines and any(x.startswith("-A HEADRACE_SC_OUTPUT") for x in lines)


@pytest.mark.parametrize("family", [4, 6])
def test_declines_a_table_that_is_not_new(two: tuple[str, str], family: int) -> None:
    name, _ = two
    text = text_of(SidecarSpec(), family)
    restore(name, family, "*nat\n-A POSTROUTING -p udp -j ACCEPT\nCOMMIT\n")  # someone else's rule
    before = table_blob(name, family)
    assert "not empty" in (fresh_here(name, family, text) or "")
    assert table_blob(name, family) == before
    restore(name, family, "*nat\n-F POSTROUTING\n:OUTPUT DROP [0:0]\nCOMMIT\n")  # same entry count, DROP policy
    before = table_blob(name, family)
    assert "not empty" in (fresh_here(name, family, text) or "")
    assert table_blob(name, family) == before
    restore(name, family, "*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")
    assert fresh_here(name, family, text) is None
    before = table_blob(name, family)
    assert "not empty" in (fresh_here(name, family, text) or "")  # ours are there: iptables-restore refuses -N
    assert table_blob(name, family) == before


def test_declines_while_the_xtables_lock_is_held(two: tuple[str, str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    name, _ = two
    lock = tmp_path / "xtables.lock"
    monkeypatch.setenv("XTABLES_LOCKFILE", str(lock))
    holder = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        assert fresh_here(name, 4, text_of(SidecarSpec(), 4)) == "xtables lock busy"
    finally:
        os.close(holder)
    assert fresh_here(name, 4, text_of(SidecarSpec(), 4)) is None


@pytest.mark.parametrize("flavour", ["legacy", "nft"])
def test_the_rules_it_writes_redirect_traffic(plain_node: SimNode, flavour: str) -> None:
    node = plain_node
    pod = node.add_pod("shop", "web")
    peer = node.add_pod("shop", "peer")
    with entered(pod.netns.path):
        write = restore_fresh_here if flavour == "legacy" else restore_fresh_nft_here
        assert write(4, text_of(SidecarSpec(), 4)) is None
    sidecar_redirected(pod, peer)


@pytest.mark.parametrize("flavour", ["legacy", "nft"])
def test_concurrent_adds_all_go_in_process(flavour: str) -> None:
    """Eight ADDs at once (the agent's netns threads): none declines for the others' sake (legacy: the
    agent's threads take turns on the xtables lock), every netns gets its full table."""
    names = [make_netns() for _ in range(8)]
    text = text_of(SidecarSpec(), 4)
    try:
        with ThreadPoolExecutor(len(names)) as pool:
            results = list(pool.map(lambda n: fresh_here(n, 4, text, flavour), names))
        assert results == [None] * len(names)
        expected = saved(names[0], 4, flavour)
        assert any(x.startswith("-A HEADRACE_SC_OUTPUT") for x in expected)
        assert all(saved(n, 4, flavour) == expected for n in names[1:])
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.parametrize("flavour", ["legacy", "nft"])
def test_a_table_the_kernel_refuses_leaves_every_table_as_it_was(two: tuple[str, str], flavour: str) -> None:
    """The owner match in a nat PREROUTING rule passes our reader but not the kernel (owner is for locally
    made packets): legacy has swapped mangle in already and puts it back; nft's one transaction is
    aborted. Either way nothing of the text is left, and the text goes to iptables-restore (which refuses
    it too)."""
    name, _ = two
    text = ("*mangle\n-N HRX\n-I OUTPUT 1 -j HRX\n-A HRX -j RETURN\nCOMMIT\n"
            "*nat\n-I PREROUTING 1 -m owner --uid-owner 1 -j RETURN\nCOMMIT\n")
    assert "refused by the kernel" in (fresh_here(name, 4, text, flavour) or "")
    after = saved(name, 4, flavour)  # legacy: the tables exist now (reading one makes it), empty
    assert not [line for line in after if line.startswith("-") or "HRX" in line], after
    if flavour == "legacy":
        assert table_blob(name, 4, "mangle")[1] == masked(pristine(4, 0b11111).entries, LAYOUTS[4], comefrom=True)


# -- the way back (legacy): a table still exactly our write gets its empty chains back in-process -----------


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("scenario", [*SPECS, *AMBIENT])
def test_legacy_unrestore_puts_the_new_netns_tables_back(two: tuple[str, str], scenario: str, family: int) -> None:
    ours, fresh = two
    text = text_of(SPECS.get(scenario) or AMBIENT[scenario], family)
    assert fresh_here(ours, family, text) is None
    with entered(f"/run/netns/{ours}"):
        assert unrestore_fresh_here(family, text) is None
    restore(fresh, family, "*nat\nCOMMIT\n*mangle\nCOMMIT\n")  # a new netns' tables, made by iptables
    for table in ("nat", "mangle") if scenario in AMBIENT else ("nat",):
        assert table_blob(ours, family, table) == table_blob(fresh, family, table)
    assert not [line for line in saved(ours, family) if "HEADRACE" in line]


def test_legacy_unrestore_declines_a_table_someone_changed(two: tuple[str, str]) -> None:
    name, _ = two
    text = text_of(SidecarSpec(), 4)
    assert fresh_here(name, 4, text) is None
    restore(name, 4, "*nat\n-A POSTROUTING -p udp -j ACCEPT\nCOMMIT\n")  # someone else's rule beside ours
    before = table_blob(name, 4)
    with entered(f"/run/netns/{name}"):
        assert "not what we wrote" in (unrestore_fresh_here(4, text) or "")
    assert table_blob(name, 4) == before


LegacyPod = tuple[str, IptablesBackend, PodTarget]


@pytest.fixture
def legacy_pod(two: tuple[str, str]) -> Iterator[LegacyPod]:
    """A dual-stack pod's netns (lo up), a legacy backend and the pod, with the agent's command runner."""
    name, _ = two
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    previous = spawn.install_runner(InNetnsSpawner(IN_PROCESS, RESTORES))
    try:
        yield (name, IptablesBackend("legacy", in_process_check=False),
               PodTarget("u1", "default", "web", f"/run/netns/{name}", 0, ("10.5.0.2", "fd00:5::2")))
    finally:
        spawn.install_runner(previous)


@pytest.mark.parametrize("restarted", [False, True], ids=["applied", "restarted"])
@pytest.mark.parametrize("spec", [SidecarSpec(), AmbientSpec()], ids=["sidecar", "ambient"])
def test_a_legacy_pods_removal_starts_no_process(legacy_pod: LegacyPod, spec: SidecarSpec | AmbientSpec,
                                                  restarted: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's removal of a pod it applied (a sidecar's warm ADD, an ambient enrolment), or, after a
    restart, found intact: still exactly its rules, so the tables get their empty chains back in-process
    and an ambient pod's policy routing goes over rtnetlink, no iptables-save/restore or ip started."""
    name, backend, target = legacy_pod
    fresh_write(backend, target, spec)
    assert any("HEADRACE" in line for line in saved(name, 4))
    assert len(ambient_routing(name)) == (4 if isinstance(spec, AmbientSpec) else 0)
    if restarted:  # a new agent: it knows the pod's rules from its check of them only
        backend = IptablesBackend("legacy", in_process_check=False)
        assert backend.check(target, spec) == []

    def no_process(*_a: object, **_k: object) -> None:
        raise AssertionError("a process was started to remove the rules")

    with monkeypatch.context() as m:
        m.setattr(spawn, "run_many", no_process)
        backend.remove(target)
    assert not [line for f in (4, 6) for line in saved(name, f) if "HEADRACE" in line]
    assert ambient_routing(name) == []


def test_a_family_someone_changed_is_left_to_iptables_restore_and_both_lose_their_routing(
    legacy_pod: LegacyPod
) -> None:
    """A dual-stack ambient pod whose IPv6 mangle table got a rule of someone else's after the enrolment:
    IPv4 comes out in-process with its routing, IPv6 through iptables-restore (which finds our chains
    there) with its routing; the other rule stays."""
    name, backend, target = legacy_pod
    fresh_write(backend, target, AmbientSpec())
    restore(name, 6, "*mangle\n-A OUTPUT -p udp -j ACCEPT\nCOMMIT\n")
    backend.remove(target)
    assert not [line for f in (4, 6) for line in saved(name, f) if "HEADRACE" in line]
    assert "-A OUTPUT -p udp -j ACCEPT" in saved(name, 6)
    assert ambient_routing(name) == []
