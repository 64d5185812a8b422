"""install/uninstall on a real (temporary) CNI config dir: primary choice, atomic + idempotent writes,
.conf conversion and restore, refusal of broken files with nothing changed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from node_agent.install_cni import confdir
from node_agent.install_cni.atomic import remove_file, write_atomic
from node_agent.install_cni.conflist import ConfigError
from node_agent.install_cni.settings import PluginSettings

DATA = Path(__file__).parent.parent / "data" / "conflists"
ENTRY = PluginSettings(objects_dir="/var/lib/headrace/objects").entry()
REAL_SHAPES = [
    "87-podman-bridge.conflist",
    "10-containerd-net.conflist",
    "10-calico.conflist",
    "05-cilium.conflist",
    "10-flannel.conflist",
    "10-kindnet.conflist",
]


def snapshot(d: Path) -> dict[str, tuple[bytes, int, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode) for p in sorted(d.iterdir())}


def put(d: Path, *names: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(DATA / n, d / n)


@pytest.mark.parametrize("name", REAL_SHAPES)
def test_install_is_idempotent_and_keeps_other_plugins(tmp_path, name):
    d = tmp_path / "net.d"
    put(d, name)
    os.chmod(d / name, 0o600)
    state = tmp_path / "state.json"
    original = json.loads((d / name).read_text())

    change = confdir.install_config(str(d), ENTRY, str(state))
    assert change.action == "inserted" and change.path == str(d / name)
    doc = json.loads((d / name).read_text())
    assert doc["plugins"] == [*original["plugins"], ENTRY]
    assert (d / name).stat().st_mode & 0o777 == 0o600  # mode kept
    assert confdir.entry_present(str(d), ENTRY)

    before = snapshot(d)
    assert confdir.install_config(str(d), ENTRY, str(state)).action == "unchanged"
    assert snapshot(d) == before  # not even mtime changes
    assert not state.exists()  # nothing to remember for a conflist

    changes = confdir.uninstall_config(str(d), str(state))
    assert [c.action for c in changes] == ["removed"]
    assert json.loads((d / name).read_text()) == original
    assert sorted(p.name for p in d.iterdir()) == [name]  # no temp files left


def test_update_changed_settings(tmp_path):
    d = tmp_path / "net.d"
    put(d, "10-calico.conflist")
    confdir.install_config(str(d), ENTRY)
    new_entry = PluginSettings(backend="ebpf").entry()
    assert confdir.install_config(str(d), new_entry).action == "updated"
    plugins = json.loads((d / "10-calico.conflist").read_text())["plugins"]
    assert [p["type"] for p in plugins] == ["calico", "bandwidth", "portmap", "headrace-cni"]
    assert plugins[-1]["backend"] == "ebpf"


def test_only_the_lexically_first_config_is_changed(tmp_path):
    d = tmp_path / "net.d"
    put(d, "10-calico.conflist", "05-cilium.conflist", "87-podman-bridge.conflist", "99-loopback.conf")
    (d / "README").write_text("not a config")
    (d / "calico-kubeconfig").write_text("apiVersion: v1")
    before = snapshot(d)
    change = confdir.install_config(str(d), ENTRY)
    assert change.path == str(d / "05-cilium.conflist")
    after = snapshot(d)
    assert {k for k in after if after[k] != before[k]} == {"05-cilium.conflist"}


def test_non_config_json_is_skipped(tmp_path):
    d = tmp_path / "net.d"
    put(d, "10-flannel.conflist")
    (d / "00-settings.json").write_text('{"kind": "not-a-network"}')
    assert confdir.install_config(str(d), ENTRY).path == str(d / "10-flannel.conflist")


MULTUS_IN_A_CONF = {"cniVersion": "0.3.1", "name": "multus-cni-network",
                    "plugins": [{"type": "multus", "kubeconfig": "/etc/cni/net.d/multus.d/multus.kubeconfig"}]}


def test_a_conflist_in_a_conf_file_is_skipped_as_the_runtime_skips_it(tmp_path):
    """containerd refuses a .conf without 'type' and CRI-O skips it: our entry goes into the file CRI-O
    uses, and the .conf is left as it is."""
    d = tmp_path / "net.d"
    put(d, "10-calico.conflist")
    (d / "00-multus.conf").write_text(json.dumps(MULTUS_IN_A_CONF))
    (d / "05-empty.conflist").write_text('{"name": "empty", "plugins": []}')
    before = (d / "00-multus.conf").read_bytes()
    change = confdir.install_config(str(d), ENTRY)
    assert change.action == "inserted" and change.path == str(d / "10-calico.conflist")
    assert [s.split(":")[0] for s in change.skipped] == ["00-multus.conf", "05-empty.conflist"]
    assert (d / "00-multus.conf").read_bytes() == before
    assert json.loads((d / "10-calico.conflist").read_text())["plugins"][-1] == ENTRY
    assert confdir.entry_present(str(d), ENTRY)


def test_an_entry_in_a_file_the_runtime_does_not_load_is_not_ready(tmp_path):
    """The readiness check looks where the runtime looks: our entry in a conflist-shaped .conf (which
    no runtime loads as a chain) is no entry."""
    d = tmp_path / "net.d"
    put(d, "10-calico.conflist")
    (d / "00-multus.conf").write_text(json.dumps({**MULTUS_IN_A_CONF, "plugins": [
        *MULTUS_IN_A_CONF["plugins"], ENTRY]}))
    assert not confdir.entry_present(str(d))
    confdir.install_config(str(d), ENTRY)
    assert confdir.entry_present(str(d), ENTRY)


def test_conf_is_converted_then_restored_exactly(tmp_path):
    d = tmp_path / "net.d"
    put(d, "10-mynet.conf", "99-loopback.conf")
    state = tmp_path / "inst" / "state.json"
    conf_bytes = (d / "10-mynet.conf").read_bytes()

    change = confdir.install_config(str(d), ENTRY, str(state))
    assert change.action == "converted"
    assert change.converted_from == str(d / "10-mynet.conf")
    assert sorted(p.name for p in d.iterdir()) == ["10-mynet.conflist", "99-loopback.conf"]
    doc = json.loads((d / "10-mynet.conflist").read_text())
    conf = json.loads(conf_bytes)
    assert doc == {"cniVersion": "1.0.0", "name": "mynet", "plugins": [conf, ENTRY]}
    assert confdir.install_config(str(d), ENTRY, str(state)).action == "unchanged"

    changes = confdir.uninstall_config(str(d), str(state))
    assert [c.action for c in changes] == ["restored"]
    assert sorted(p.name for p in d.iterdir()) == ["10-mynet.conf", "99-loopback.conf"]
    assert (d / "10-mynet.conf").read_bytes() == conf_bytes
    assert not state.exists()


def test_converted_file_changed_by_others_is_not_restored(tmp_path):
    d = tmp_path / "net.d"
    put(d, "10-mynet.conf")
    state = tmp_path / "state.json"
    confdir.install_config(str(d), ENTRY, str(state))
    doc = json.loads((d / "10-mynet.conflist").read_text())
    doc["plugins"].insert(1, {"type": "portmap"})  # someone added a plugin since
    (d / "10-mynet.conflist").write_text(json.dumps(doc))
    changes = confdir.uninstall_config(str(d), str(state))
    assert [c.action for c in changes] == ["removed"]
    assert [p["type"] for p in json.loads((d / "10-mynet.conflist").read_text())["plugins"]] == [
        "bridge", "portmap"]


def test_conversion_refused_when_target_exists(tmp_path):
    d = tmp_path / "net.d"
    put(d, "10-mynet.conf")
    (d / "10-mynet.conflist").write_text('{"name": "other", "plugins": [{"type": "bridge"}]}')
    before = snapshot(d)
    with pytest.raises(ConfigError, match="already exists and was not made by install-cni"):
        confdir.install_config(str(d), ENTRY)
    assert snapshot(d) == before


def rewrite_conf(d: Path, name: str = "10-mynet.conf", mode: int = 0o600) -> bytes:
    """What Multus, OVN-Kubernetes or an older Cilium do on restart: write their .conf again."""
    conf = json.loads((DATA / "10-mynet.conf").read_text())
    conf["ipam"]["subnet"] = "10.99.0.0/16"
    raw = json.dumps(conf, indent=4).encode()
    (d / name).write_bytes(raw)
    os.chmod(d / name, mode)
    return raw


def test_conf_written_again_by_its_owner_is_converted_again(tmp_path, monkeypatch):
    d = tmp_path / "net.d"
    put(d, "10-mynet.conf")
    state = tmp_path / "inst" / "state.json"
    assert confdir.install_config(str(d), ENTRY, str(state)).action == "converted"
    raw = rewrite_conf(d)  # sorts before our conflist: the runtime now uses it, without our entry
    assert not confdir.entry_present(str(d))

    seen: list[tuple[str, object, str]] = []

    def remove_after_write(path: str) -> bool:  # the conflist and the state are written before the .conf goes
        original = json.loads(state.read_text())["converted"]["original"]
        seen.append((os.path.basename(path), json.loads((d / "10-mynet.conflist").read_text()), original))
        return remove_file(path)

    monkeypatch.setattr("node_agent.install_cni.confdir.remove_file", remove_after_write)
    change = confdir.install_config(str(d), ENTRY, str(state))
    monkeypatch.undo()
    assert change.action == "converted" and change.converted_from == str(d / "10-mynet.conf")
    expected = {"cniVersion": "1.0.0", "name": "mynet", "plugins": [json.loads(raw), ENTRY]}
    assert seen == [("10-mynet.conf", expected, raw.decode())]
    assert sorted(p.name for p in d.iterdir()) == ["10-mynet.conflist"]
    assert (d / "10-mynet.conflist").stat().st_mode & 0o777 == 0o600
    assert confdir.entry_present(str(d), ENTRY)
    assert json.loads(state.read_text())["converted"]["original"] == raw.decode()
    assert confdir.install_config(str(d), ENTRY, str(state)).action == "unchanged"

    changes = confdir.uninstall_config(str(d), str(state))
    assert [c.action for c in changes] == ["restored"]
    assert sorted(p.name for p in d.iterdir()) == ["10-mynet.conf"]
    assert (d / "10-mynet.conf").read_bytes() == raw  # the owner's latest, not the first we converted
    assert (d / "10-mynet.conf").stat().st_mode & 0o777 == 0o600


def test_json_written_again_by_its_owner_is_converted_again(tmp_path):
    """A .json sorts after its .conflist: without converting it again the runtime keeps using our
    conversion of the old one."""
    d = tmp_path / "net.d"
    d.mkdir()
    shutil.copy(DATA / "10-mynet.conf", d / "10-mynet.json")
    state = tmp_path / "state.json"
    assert confdir.install_config(str(d), ENTRY, str(state)).action == "converted"
    raw = rewrite_conf(d, "10-mynet.json", 0o644)
    change = confdir.install_config(str(d), ENTRY, str(state))
    assert change.action == "converted" and change.converted_from == str(d / "10-mynet.json")
    assert sorted(p.name for p in d.iterdir()) == ["10-mynet.conflist"]
    assert json.loads((d / "10-mynet.conflist").read_text())["plugins"] == [json.loads(raw), ENTRY]
    confdir.uninstall_config(str(d), str(state))
    assert (d / "10-mynet.json").read_bytes() == raw


def test_a_conflist_we_did_not_make_is_never_overwritten(tmp_path):
    d = tmp_path / "net.d"
    put(d, "10-mynet.conf")
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"converted": {"conflist": "10-mynet.conflist", "conf": "10-other.conf",
                                               "mode": 420, "original": "{}"}}))
    (d / "10-mynet.conflist").write_text('{"name": "other", "plugins": [{"type": "bridge"}]}')
    before = snapshot(d)
    with pytest.raises(ConfigError, match="already exists and was not made by install-cni"):
        confdir.install_config(str(d), ENTRY, str(state))
    assert snapshot(d) == before


def test_after_uninstall_the_conflist_left_behind_is_not_ours(tmp_path):
    """Uninstall leaves a converted conflist that others changed since (it cannot restore the .conf): the
    record of the conversion goes with it, and a later install does not overwrite that file."""
    d = tmp_path / "net.d"
    put(d, "10-mynet.conf")
    state = tmp_path / "state.json"
    confdir.install_config(str(d), ENTRY, str(state))
    doc = json.loads((d / "10-mynet.conflist").read_text())
    doc["plugins"].insert(1, {"type": "portmap"})
    (d / "10-mynet.conflist").write_text(json.dumps(doc))
    assert [c.action for c in confdir.uninstall_config(str(d), str(state))] == ["removed"]
    assert not state.exists()
    rewrite_conf(d)
    with pytest.raises(ConfigError, match="already exists"):
        confdir.install_config(str(d), ENTRY, str(state))


@pytest.mark.parametrize(("name", "needle"), [("20-comments.conflist", "comments"), ("20-bad.conflist", "JSON")])
def test_broken_primary_refused_nothing_changed(tmp_path, name, needle):
    d = tmp_path / "net.d"
    put(d, name, "87-podman-bridge.conflist")
    before = snapshot(d)
    with pytest.raises(ConfigError) as exc:
        confdir.install_config(str(d), ENTRY)
    assert str(d / name) in str(exc.value) and needle in str(exc.value)
    assert snapshot(d) == before


def test_broken_file_after_the_primary_is_ignored(tmp_path):
    d = tmp_path / "net.d"
    put(d, "10-flannel.conflist", "20-bad.conflist")
    assert confdir.install_config(str(d), ENTRY).action == "inserted"


def test_missing_or_empty_dir_is_no_config(tmp_path):
    assert confdir.install_config(str(tmp_path / "absent"), ENTRY).action == "no-config"
    (tmp_path / "empty").mkdir()
    assert confdir.install_config(str(tmp_path / "empty"), ENTRY).action == "no-config"
    assert confdir.uninstall_config(str(tmp_path / "absent")) == []


def test_uninstall_removes_only_our_entry_everywhere(tmp_path):
    d = tmp_path / "net.d"
    put(d, "10-calico.conflist", "87-podman-bridge.conflist")
    for n in ("10-calico.conflist", "87-podman-bridge.conflist"):
        doc = json.loads((d / n).read_text())
        doc["plugins"].append(dict(ENTRY))
        (d / n).write_text(json.dumps(doc))
    put(d, "20-bad.conflist")
    changes = confdir.uninstall_config(str(d))
    assert sorted(Path(c.path or "").name for c in changes) == ["10-calico.conflist", "87-podman-bridge.conflist"]
    for n in ("10-calico.conflist", "87-podman-bridge.conflist"):
        assert json.loads((d / n).read_text()) == json.loads((DATA / n).read_text())
    assert (d / "20-bad.conflist").read_bytes() == (DATA / "20-bad.conflist").read_bytes()


def test_write_atomic_idempotent_and_mode(tmp_path):
    p = tmp_path / "f"
    assert write_atomic(str(p), b"x", mode=0o640)
    st = p.stat()
    assert st.st_mode & 0o777 == 0o640
    assert not write_atomic(str(p), b"x", mode=0o640)
    assert p.stat().st_mtime_ns == st.st_mtime_ns
    assert write_atomic(str(p), b"x", mode=0o644)  # mode change is a change
    assert write_atomic(str(p), b"y", mode=0o644)
    assert p.read_bytes() == b"y"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f"]


def test_cni_0_3_1_chained_and_unsupported_version_refused(tmp_path):
    """The runtime passes the conflist's cniVersion to every plugin: chaining into a version the
    plugin refuses would fail every pod ADD on the node, so install-cni refuses that instead."""
    from node_agent.install_cni import service

    from cni.plugin.netconf import SUPPORTED_VERSIONS

    conf = tmp_path / "etc" / "cni" / "net.d"
    put(conf, "10-calico.conflist")
    opts = service.InstallOptions(host_root=str(tmp_path), install_plugin=False)
    assert "0.3.1" in SUPPORTED_VERSIONS  # kindnet, Calico and flannel still write 0.3.1
    assert service.ensure_config(opts).action == "inserted"
    with pytest.raises(ConfigError, match="cniVersion"):
        confdir.install_config(str(conf), ENTRY, supported_versions=("1.0.0",))


def test_interrupted_conversion_is_finished(tmp_path):
    d = tmp_path / "net.d"
    put(d, "10-mynet.conf")
    state = tmp_path / "state.json"
    confdir.install_config(str(d), ENTRY, str(state))
    shutil.copy(DATA / "10-mynet.conf", d / "10-mynet.conf")  # as if the removal never happened
    change = confdir.install_config(str(d), ENTRY, str(state))
    assert change.action == "converted"
    assert sorted(p.name for p in d.iterdir()) == ["10-mynet.conflist"]
    confdir.uninstall_config(str(d), str(state))
    assert (d / "10-mynet.conf").read_bytes() == (DATA / "10-mynet.conf").read_bytes()


def test_symlinked_conflist_is_written_through(tmp_path):
    real = tmp_path / "elsewhere"
    put(real, "10-calico.conflist")
    d = tmp_path / "net.d"
    d.mkdir()
    (d / "10-calico.conflist").symlink_to(real / "10-calico.conflist")
    assert confdir.install_config(str(d), ENTRY).action == "inserted"
    assert (d / "10-calico.conflist").is_symlink()
    assert json.loads((real / "10-calico.conflist").read_text())["plugins"][-1] == ENTRY
    confdir.uninstall_config(str(d))
    assert (d / "10-calico.conflist").is_symlink()
    original = json.loads((DATA / "10-calico.conflist").read_text())
    assert json.loads((real / "10-calico.conflist").read_text()) == original
