"""The plugin's standalone ADD into a new netns without a process (`cni.kernel.nft_fresh`), nftables and
iptables-nft: the tables and `::6` go in from the plugin's own process, which ends up back in its own
netns; iptables-nft's are those iptables-nft-restore writes, expression for expression; what it declines
changes nothing and the tools take it; a half-done create is taken back."""

from __future__ import annotations

import os
import subprocess

import pytest

from cni.contract.spec import SidecarSpec
from cni.kernel import iptables_run, netns, nft_fresh, nft_tables, spawn
from cni.kernel import tables as netns_tables
from cni.netlink.nft_messages import delete_tables
from cni.rules import nft_builder, nft_text
from tests.harness.netns import NetNS
from tests.kernel.test_iptables_fresh_write import SPECS, nft_ruleset, restore, saved, text_of

pytestmark = pytest.mark.kernel

SPEC = SidecarSpec(exclude_outbound_ports=(5432,))


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
    assert nft_fresh.create_fresh(ns.path, nft_builder.sidecar_table(SPEC, (4, 6)), True, "test") == "exists"
    assert listed(ns) == before
    nft_tables.apply_sidecar(ns.path, SPEC, (4, 6))  # the kubelet's retry with other annotations: nft
    assert listed(ns) == nft_builder.sidecar_table(SPEC, (4, 6)).render()


def test_a_failed_lo_address_takes_the_table_out_again(ns: NetNS, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused() -> None:
        raise PermissionError(1, "refused for the test")

    monkeypatch.setattr(nft_fresh, "passthrough_v6_here", refused)
    declined = nft_fresh.create_fresh(ns.path, nft_builder.sidecar_table(SPEC, (4, 6)), True, "test")
    assert declined is not None and "refused for the test" in declined
    assert listed(ns) == ""
    nft_tables.apply_sidecar(ns.path, SPEC, (4, 6))  # declined: nft and `ip` do it
    assert "inet6 ::6/128" in lo_v6(ns) and listed(ns) == nft_builder.sidecar_table(SPEC, (4, 6)).render()


def test_a_table_that_cannot_be_taken_out_again_fails_the_add(ns: NetNS, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worst case: the address fails and so does the table's removal. The ADD fails with both reasons
    (the runtime's DEL then removes the table) and the plugin is back in its own netns."""
    def refused() -> None:
        raise PermissionError(1, "refused for the test")

    monkeypatch.setattr(nft_fresh, "passthrough_v6_here", refused)
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
    assert nft_fresh.create_fresh(ns.path, table, False, "test") is not None and listed(ns) == ""


def test_a_netns_path_that_is_no_netns_is_declined() -> None:
    declined = nft_fresh.create_fresh("/proc/self/status", nft_builder.sidecar_table(SPEC, (4,)), False, "test")
    assert declined is not None and declined.startswith("entering /proc/self/status")


# -- iptables-nft -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["default", "exclude-outbound", "include-ranges", "kubevirt"])
def test_iptables_nft_tables_go_in_without_a_process_as_iptables_nft_restore_writes_them(
    two: tuple[str, str], scenario: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, ours = two
    spec = SPECS[scenario]
    for family in (4, 6):
        restore(real, family, text_of(spec, family), "nft")
    home = os.stat("/proc/thread-self/ns/net").st_ino
    monkeypatch.setattr(spawn, "run_many", no_process)
    netns_tables.apply_sidecar(f"/run/netns/{ours}", spec, (4, 6), "nft", optimistic=True, fresh_here=True)
    monkeypatch.undo()
    assert os.stat("/proc/thread-self/ns/net").st_ino == home
    assert nft_ruleset(ours) == nft_ruleset(real)
    assert all(saved(ours, family, "nft") == saved(real, family, "nft") for family in (4, 6))
    lo = subprocess.run(["ip", "-n", ours, "-6", "addr", "show", "dev", "lo"], capture_output=True, text=True,
                        check=True).stdout
    assert "inet6 ::6/128" in lo


def test_iptables_nft_chains_already_there_take_the_processes(two: tuple[str, str]) -> None:
    """A retried ADD (our chains there): declined unchanged, then the save → transition → restore way."""
    _, ours = two
    path = f"/run/netns/{ours}"
    netns_tables.apply_sidecar(path, SidecarSpec(), (4,), "nft", optimistic=True, fresh_here=True)
    netns_tables.apply_sidecar(path, SPEC, (4,), "nft", optimistic=True, fresh_here=True)
    assert netns_tables.check_sidecar(path, SPEC, (4,), "nft") == []


def test_iptables_nft_without_the_tools_is_left_to_them(two: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """No iptables-nft-restore on PATH: nothing is written in-process (the processes then fail to start:
    the ADD fails as it always did, rather than a table a later DEL could not remove)."""
    _, ours = two
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises((iptables_run.IptablesError, OSError)):
        netns_tables.apply_sidecar(f"/run/netns/{ours}", SPEC, (4,), "nft", optimistic=True, fresh_here=True)
    monkeypatch.undo()
    assert not any(line.startswith("-A HEADRACE") for line in saved(ours, 4, "nft"))


def test_a_runtime_without_ctypes_declines(ns: NetNS, monkeypatch: pytest.MonkeyPatch) -> None:
    """A runtime whose `_ctypes` cannot load (no libffi): the plugin cannot enter a netns itself, so the
    create is declined (the processes do it) instead of failing the ADD."""
    def no_ctypes() -> None:
        raise ImportError("libffi.so.8: cannot open shared object file")

    monkeypatch.delattr(os, "setns", raising=False)
    monkeypatch.setattr(netns, "_setns_call", no_ctypes)
    declined = nft_fresh.create_fresh(ns.path, nft_builder.sidecar_table(SPEC, (4,)), False, "test")
    assert declined is not None and "libffi" in declined and listed(ns) == ""
