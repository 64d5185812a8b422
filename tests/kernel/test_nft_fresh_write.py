"""The nftables backend's in-process creation of a pod table (`fresh_batch` + `fresh_write`) against
libnftables on the real kernel:

- for every REDIRECT-mode sidecar scenario and every ambient scenario of the golden files, the table is
  the one `nft -f` writes from the same text, expression for expression (`nft --debug=netlink`, handles
  aside), and nft lists it exactly as the golden text;
- it declines, changing nothing, what it does not lay out (TPROXY and node tables) and a netns that has a
  table of that name already (the caller then goes to libnftables);
- the rules it writes redirect real traffic (outbound TCP lands on 15001 with its original destination,
  inbound on 15006, the proxy's own connections pass), and the agent's ADD apply uses it.
"""

from __future__ import annotations

import subprocess

import pytest
from node_agent.backends.base import PodTarget
from node_agent.backends.nftables import fresh_write
from node_agent.backends.nftables.backend import NftablesBackend
from node_agent.lab.simnode import SimNode
from node_agent.serve.sidecar_apply import apply_for_add

from cni.contract.spec import SidecarSpec
from cni.kernel.netns import entered
from cni.rules import nft_builder, nft_text
from tests.harness.traffic import sidecar_redirected
from tests.unit.nft_scenarios import SCENARIOS

pytestmark = pytest.mark.kernel
BUILT_HERE = sorted(n for n in SCENARIOS if n.startswith(("sidecar", "ambient")) and "tproxy" not in n)
NOT_BUILT_HERE = sorted(set(SCENARIOS) - set(BUILT_HERE))


def nft(name: str, *args: str, stdin: str | None = None) -> str:
    return subprocess.run(["ip", "netns", "exec", name, "nft", *args], input=stdin, capture_output=True,
                          text=True, check=True).stdout


def expressions(name: str) -> list[str]:
    """`nft --debug=netlink list ruleset`: each rule's expressions and user data (handles taken off)."""
    lines = []
    for line in nft(name, "--debug=netlink", "list", "ruleset").splitlines():
        words = line.split()
        if len(words) >= 4 and words[:2] == ["inet", "headrace"] and all(w.isdigit() for w in words[3:]):
            line = " ".join(words[:3])  # "inet headrace CHAIN <handle> [<previous handle>]"
        lines.append(line)
    return lines


def create_in(name: str, table: nft_text.NftTable) -> str | None:
    with entered(f"/run/netns/{name}"):
        return fresh_write.create_here(table)


@pytest.mark.parametrize("scenario", BUILT_HERE)
def test_the_same_table_as_libnftables(two: tuple[str, str], scenario: str) -> None:
    real, ours = two
    table = SCENARIOS[scenario]()
    nft(real, "-f", "-", stdin=nft_text.create_text(table))
    assert create_in(ours, table) is None
    assert expressions(ours) == expressions(real)
    assert nft(ours, "list", "table", "inet", "headrace") == table.render()


@pytest.mark.parametrize("scenario", NOT_BUILT_HERE)
def test_declines_what_it_does_not_lay_out_and_changes_nothing(two: tuple[str, str], scenario: str) -> None:
    name, _ = two
    assert (create_in(name, SCENARIOS[scenario]()) or "").startswith("not built in-process")
    assert nft(name, "list", "ruleset") == ""


def test_declines_a_netns_with_our_table_and_changes_nothing(two: tuple[str, str]) -> None:
    name, _ = two
    old = nft_builder.sidecar_table(SidecarSpec(exclude_inbound_ports=(22,)), (4,))
    nft(name, "-f", "-", stdin=nft_text.create_text(old))
    before = expressions(name)
    assert create_in(name, nft_builder.sidecar_table(SidecarSpec(), (4, 6))) == fresh_write.EXISTS
    assert expressions(name) == before


def test_the_rules_it_writes_redirect_traffic(plain_node: SimNode) -> None:
    node = plain_node
    pod = node.add_pod("shop", "web")
    peer = node.add_pod("shop", "peer")
    with entered(pod.netns.path):
        assert fresh_write.create_here(nft_builder.sidecar_table(SidecarSpec(), (4, 6))) is None
    sidecar_redirected(pod, peer)


def test_the_agents_add_apply_writes_it_in_process(two: tuple[str, str]) -> None:
    """The warm ADD's apply (no table yet): the table lands, and nft lists exactly the builder's text; a
    second apply (the kubelet retrying) finds ours and replaces it through libnftables."""
    name, _ = two
    path = f"/run/netns/{name}"
    spec = SidecarSpec(exclude_outbound_ports=(5432,))
    target = PodTarget("u1", "shop", "web", path, 0, ("10.9.0.5", "fd00::5"))
    backend = NftablesBackend()
    apply_for_add(backend, target, spec)
    _table, text = backend.wanted(spec, (4, 6))
    assert nft(name, "list", "table", "inet", "headrace") == text
    apply_for_add(backend, target, spec)
    assert nft(name, "list", "table", "inet", "headrace") == text


def test_a_batch_the_kernel_refuses_changes_nothing(two: tuple[str, str]) -> None:
    """A redirect in a filter chain passes the builder but not the kernel (NAT statements belong in nat
    chains): the one transaction is aborted, no table is left, and the reason says so (the caller then
    hands the text to libnftables, which reports the kernel's refusal)."""
    name, _ = two
    table = nft_text.NftTable("headrace", (
        nft_text.Chain("c", "type filter hook output priority 0", ("meta l4proto tcp redirect to :15001",)),))
    assert (create_in(name, table) or "").startswith("refused by the kernel")
    assert nft(name, "list", "ruleset") == ""
