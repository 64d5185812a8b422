"""Symlinks in the CNI config dir followed as the host follows them, from a process that sees the host's / at
a host root (the DaemonSet's /host): absolute targets under the host root, relative ones from the link's
directory, `..` stopping at the host root; the file they lead to is the one read and written; a link that
leads nowhere here is an error naming it, never skipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from node_agent.cli import main as cli
from node_agent.install_cni import confdir, hostpath, service
from node_agent.install_cni.conflist import ConfigError
from node_agent.install_cni.settings import PluginSettings

DATA = Path(__file__).parent.parent / "data" / "conflists"
ENTRY = PluginSettings(objects_dir="/var/lib/headrace/objects").entry()
#: where the links point on the "host"; nothing is there in this process's own file system
TARGET_DIR = "/var/lib/headrace-test-cilium"


def host(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "host"
    conf = root / "etc" / "cni" / "net.d"
    conf.mkdir(parents=True)
    shutil.copy(DATA / "10-flannel.conflist", conf)  # what the runtime would use if the link were skipped
    return root, conf


def place_target(root: Path, name: str = "05-cilium.conflist") -> Path:
    target = root / TARGET_DIR.lstrip("/") / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / "05-cilium.conflist", target)
    return target


def entries(path: Path) -> list[str]:
    return [p["type"] for p in json.loads(path.read_text())["plugins"]]


@pytest.mark.parametrize("link", [
    f"{TARGET_DIR}/05-cilium.conflist",  # absolute: the host's path, not this process's
    f"../../..{TARGET_DIR}/05-cilium.conflist",  # relative to the link's directory
    f"../../../../../../../..{TARGET_DIR}/05-cilium.conflist",  # `..` stops at the host root
])
def test_a_link_is_followed_on_the_host_and_written_through(tmp_path, link):
    assert not Path(TARGET_DIR).exists()
    root, conf = host(tmp_path)
    target = place_target(root)
    (conf / "05-cilium.conflist").symlink_to(link)
    flannel = (conf / "10-flannel.conflist").read_bytes()
    state = tmp_path / "state.json"

    change = confdir.install_config(str(conf), ENTRY, str(state), host_root=str(root))
    assert change.action == "inserted" and change.path == str(conf / "05-cilium.conflist")
    assert (conf / "05-cilium.conflist").is_symlink() and entries(target)[-1] == "headrace-cni"
    assert (conf / "10-flannel.conflist").read_bytes() == flannel
    assert confdir.entry_present(str(conf), ENTRY, host_root=str(root))

    confdir.uninstall_config(str(conf), str(state), host_root=str(root))
    assert json.loads(target.read_text()) == json.loads((DATA / "05-cilium.conflist").read_text())
    assert (conf / "05-cilium.conflist").is_symlink()


def test_links_are_followed_hop_by_hop(tmp_path):
    root, conf = host(tmp_path)
    target = place_target(root)
    hop = root / "etc" / "cilium-current"
    hop.symlink_to(TARGET_DIR)  # a link to a directory, absolute
    (conf / "05-cilium.conflist").symlink_to("/etc/cilium-current/05-cilium.conflist")
    opts = service.InstallOptions(host_root=str(root), install_plugin=False)
    assert service.ensure_config(opts).action == "inserted"
    assert entries(target)[-1] == "headrace-cni"


@pytest.mark.parametrize(("make", "needle"), [
    (lambda conf: (conf / "05-cilium.conflist").symlink_to(f"{TARGET_DIR}/05-cilium.conflist"), "not mounted"),
    (lambda conf: (conf / "05-loop.conflist").symlink_to("05-loop.conflist"), "levels of symbolic links"),
])
def test_a_link_that_leads_nowhere_here_is_an_error_naming_it(tmp_path, make, needle):
    """The runtime may well load what the link names (its directory is just not mounted here): chaining
    into the next file instead would leave pods without our entry and the check saying ready."""
    root, conf = host(tmp_path)
    make(conf)
    flannel = (conf / "10-flannel.conflist").read_bytes()
    with pytest.raises(ConfigError, match=needle) as exc:
        confdir.install_config(str(conf), ENTRY, host_root=str(root))
    assert exc.value.filename.startswith(str(conf / "05-"))
    assert (conf / "10-flannel.conflist").read_bytes() == flannel
    assert not confdir.entry_present(str(conf), host_root=str(root))


def test_the_check_follows_links_on_the_host(tmp_path):
    root, conf = host(tmp_path)
    target = place_target(root)
    (conf / "05-cilium.conflist").symlink_to(f"{TARGET_DIR}/05-cilium.conflist")
    confdir.install_config(str(conf), ENTRY, host_root=str(root))
    assert entries(target)[-1] == "headrace-cni"
    res = CliRunner().invoke(cli, ["install-cni", "--check", "--host-root", str(root)])
    assert res.exit_code == 1 and "no headrace-cni launcher" in res.output, res.output  # the entry was found


def test_resolve_stays_under_the_host_root(tmp_path):
    root = tmp_path / "host"
    (root / "a").mkdir(parents=True)
    (root / "a" / "up").symlink_to("../../../../etc")
    (root / "a" / "abs").symlink_to("/a/up/passwd")
    assert hostpath.resolve(str(root / "a" / "up"), str(root)) == str(root / "etc")
    assert hostpath.resolve(str(root / "a" / "abs"), str(root)) == str(root / "etc" / "passwd")
    assert hostpath.resolve(str(root / "a" / "x" / ".." / "y"), str(root)) == str(root / "a" / "y")
    assert hostpath.host_view(str(root / "a" / "y"), str(root)) == "/a/y"
    assert hostpath.resolve("/", "/") == "/"
    with pytest.raises(hostpath.LinkError, match="not under"):
        hostpath.resolve(str(tmp_path / "elsewhere"), str(root))


def test_a_dangling_link_on_the_host_itself_is_named_plainly(tmp_path):
    conf = tmp_path / "net.d"
    conf.mkdir()
    (conf / "05-gone.conflist").symlink_to(tmp_path / "gone.conflist")
    with pytest.raises(ConfigError) as exc:
        confdir.install_config(str(conf), ENTRY)
    assert exc.value.message == f"a symlink to {tmp_path / 'gone.conflist'}, which is not there"
