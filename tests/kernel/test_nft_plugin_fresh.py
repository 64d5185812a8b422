"""The plugin's standalone nftables ADD into a new netns without a process (`cni.kernel.nft_fresh`): the
table and `::6` go in from the plugin's own process, which ends up back in its own netns; what it
declines changes nothing and `nft -f` takes it; a half-done create is taken back."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from cni.contract.spec import SidecarSpec
from cni.kernel import iptables_run, nft_fresh, nft_tables, spawn
from cni.netlink.nft_messages import delete_tables
from cni.rules import nft_builder, nft_text
from tests.harness.netns import NetNS

pytestmark = pytest.mark.kernel

SPEC = SidecarSpec(exclude_outbound_ports=(5432,))


@pytest.fixture
def ns() -> Iterator[NetNS]:
    n = NetNS.create("hrnpf-")
    try:
        yield n
    finally:
        n.delete()


def listed(ns: NetNS) -> str:
    return ns.run(["nft", "list", "ruleset"]).stdout


def lo_v6(ns: NetNS) -> str:
    return ns.run(["ip", "-6", "addr", "show", "dev", "lo"]).stdout


def no_process(*_a: object, **_k: object) -> None:
    raise AssertionError("a process was started")


@pytest.mark.parametrize("families", [(4, 6), (4,)], ids=["dual", "v4"])
def test_a_new_netns_gets_the_table_and_lo_address_without_a_process(
    ns: NetNS, families: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = os.stat("/proc/thread-self/ns/net").st_ino
    monkeypatch.setattr(spawn, "run_many", no_process)
    nft_tables.apply_sidecar(ns.path, SPEC, families)
    assert os.stat("/proc/thread-self/ns/net").st_ino == home  # back in its own netns
    monkeypatch.undo()
    assert listed(ns) == nft_builder.sidecar_table(SPEC, families).render()
    assert ("inet6 ::6/128" in lo_v6(ns)) == (6 in families)
    assert nft_tables.check_sidecar(ns.path, SPEC, families) == []


def test_a_table_already_there_is_declined_unchanged_and_replaced_by_nft(ns: NetNS) -> None:
    nft_tables.apply_sidecar(ns.path, SidecarSpec(), (4, 6))
    before = listed(ns)
    assert nft_fresh.create_fresh(ns.path, nft_builder.sidecar_table(SPEC, (4, 6)), True) == "exists"
    assert listed(ns) == before
    nft_tables.apply_sidecar(ns.path, SPEC, (4, 6))  # the kubelet's retry with other annotations: nft
    assert listed(ns) == nft_builder.sidecar_table(SPEC, (4, 6)).render()


def test_a_failed_lo_address_takes_the_table_out_again(ns: NetNS, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(_address: str) -> None:
        raise PermissionError(1, "refused for the test")

    monkeypatch.setattr(nft_fresh, "replace_on_loopback", refused)
    declined = nft_fresh.create_fresh(ns.path, nft_builder.sidecar_table(SPEC, (4, 6)), True)
    assert declined is not None and "refused for the test" in declined
    assert listed(ns) == ""
    nft_tables.apply_sidecar(ns.path, SPEC, (4, 6))  # declined: nft and `ip` do it
    assert "inet6 ::6/128" in lo_v6(ns) and listed(ns) == nft_builder.sidecar_table(SPEC, (4, 6)).render()


def test_a_table_that_cannot_be_taken_out_again_fails_the_add(ns: NetNS, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worst case: the address fails and so does the table's removal. The ADD fails with both reasons
    (the runtime's DEL then removes the table) and the plugin is back in its own netns."""
    def refused(_address: str) -> None:
        raise PermissionError(1, "refused for the test")

    monkeypatch.setattr(nft_fresh, "replace_on_loopback", refused)
    monkeypatch.setattr(nft_fresh, "delete_tables", lambda _tables: delete_tables([(1, "no-such")]))
    home = os.stat("/proc/thread-self/ns/net").st_ino
    with pytest.raises(iptables_run.IptablesError, match="could not be taken out") as err:
        nft_tables.apply_sidecar(ns.path, SPEC, (4, 6))
    assert "refused for the test" in err.value.stderr and "No such file" in err.value.stderr
    assert os.stat("/proc/thread-self/ns/net").st_ino == home
    nft_tables.remove(ns.path)
    assert listed(ns) == ""


def test_what_is_not_laid_out_goes_to_nft(ns: NetNS) -> None:
    table = nft_text.NftTable(nft_text.POD_TABLE, (nft_text.Chain("x", None, ("meta mark 0x1 accept",)),))
    assert nft_fresh.create_fresh(ns.path, table, False) is not None and listed(ns) == ""


def test_a_netns_path_that_is_no_netns_is_declined() -> None:
    declined = nft_fresh.create_fresh("/proc/self/status", nft_builder.sidecar_table(SPEC, (4,)), False)
    assert declined is not None and declined.startswith("entering /proc/self/status")
