"""Pure conflist logic: primary choice, .conf conversion, insert/update/remove of our entry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from node_agent.install_cni import conflist as cl
from node_agent.install_cni.settings import PluginSettings, SettingsError

DATA = Path(__file__).parent.parent / "data" / "conflists"
REAL_SHAPES = [
    "87-podman-bridge.conflist",
    "10-containerd-net.conflist",
    "10-calico.conflist",
    "05-cilium.conflist",
    "10-flannel.conflist",
    "10-kindnet.conflist",
]
ENTRY = PluginSettings().entry()


def load(name: str) -> dict[str, Any]:
    return cl.parse_config(name, (DATA / name).read_text())


def test_candidates_sorted_and_filtered_like_libcni():
    names = ["99-loopback.conf", "10-b.conflist", "10-a.conf", "README", "10-a.conf.bak", "00-x.json",
             ".headrace-abc.tmp", "headrace-cni.kubeconfig", "05-c.conflist~"]
    assert cl.candidates(names) == ["00-x.json", "10-a.conf", "10-b.conflist", "99-loopback.conf"]


@pytest.mark.parametrize("name", REAL_SHAPES)
def test_insert_at_end_keeps_everything_else(name):
    doc = load(name)
    new = cl.upsert_entry(doc, ENTRY)
    assert new["plugins"][:-1] == doc["plugins"]
    assert new["plugins"][-1] == ENTRY
    assert {k: v for k, v in new.items() if k != "plugins"} == {k: v for k, v in doc.items() if k != "plugins"}
    assert list(new) == list(doc)  # key order kept
    assert cl.upsert_entry(new, ENTRY) == new  # idempotent
    assert cl.remove_entry(new) == doc  # exact inverse
    # the rendered file parses back to the same document
    assert json.loads(cl.render(new)) == new


def test_input_not_mutated():
    doc = load("10-calico.conflist")
    before = json.dumps(doc)
    cl.upsert_entry(doc, ENTRY)
    cl.remove_entry(doc)
    assert json.dumps(doc) == before


def test_update_replaces_and_moves_our_entry_to_the_end_once():
    doc = load("10-flannel.conflist")
    stale = {"type": "headrace-cni", "agent_socket": "/old.sock"}
    doc["plugins"].insert(0, stale)
    doc["plugins"].append(dict(stale))
    new = cl.upsert_entry(doc, ENTRY)
    assert [p["type"] for p in new["plugins"]] == ["flannel", "portmap", "headrace-cni"]
    assert new["plugins"][-1] == ENTRY


def test_conf_converted_like_libcni():
    conf = load("10-mynet.conf")
    assert cl.config_kind("10-mynet.conf", conf) == "conf"
    lst = cl.to_conflist(conf)
    assert lst == {"cniVersion": "1.0.0", "name": "mynet", "plugins": [conf]}
    assert cl.conflist_name_for("10-mynet.conf") == "10-mynet.conflist"
    assert cl.conflist_name_for("00-x.json") == "00-x.conflist"


def test_comments_refused_with_clear_error():
    with pytest.raises(cl.ConfigError) as exc:
        load("20-comments.conflist")
    assert exc.value.filename == "20-comments.conflist"
    assert "comments" in str(exc.value)


def test_bad_json_refused_with_position():
    with pytest.raises(cl.ConfigError) as exc:
        load("20-bad.conflist")
    assert "20-bad.conflist" in str(exc.value)
    assert "line 6" in str(exc.value)


@pytest.mark.parametrize("text", ["[" * 100_000, '{"mtu": ' + "1" * 5000 + "}", '{"x": /**/ ' + "[" * 100_000])
def test_json_python_cannot_hold_is_a_config_error(text):
    with pytest.raises(cl.ConfigError, match="invalid JSON"):
        cl.parse_config("10-odd.conflist", text)


def test_plugins_that_are_no_objects_are_not_our_entry():
    assert not cl.has_our_entry({"plugins": ["headrace-cni", 7]}) and not cl.has_our_entry({"plugins": "x"})


def test_comment_markers_inside_strings_are_not_comments():
    doc = cl.parse_config("x.conflist", '{"name": "a//b", "plugins": [{"type": "x", "u": "http://h/*"}]}')
    assert doc["name"] == "a//b"


@pytest.mark.parametrize(
    ("name", "text", "kind"),
    [
        ("f.conflist", '{"name": "n", "plugins": [{"type": "bridge"}]}', "conflist"),
        ("f.conf", '{"name": "n", "type": "bridge"}', "conf"),
        ("f.json", '{"name": "n", "type": "bridge"}', "conf"),
        ("f.conf", '{"name": "n", "type": "bridge", "plugins": [{"type": "x"}]}', "conf"),  # a plugin's own key
        ("f.json", '{"kind": "Config", "clusters": []}', None),
    ],
)
def test_config_kind(name, text, kind):
    assert cl.config_kind(name, cl.parse_config(name, text)) == kind


@pytest.mark.parametrize(
    ("name", "doc", "problem"),
    [
        # the kind is the extension's, as libcni's callers decide it: a conflist in a .conf is no conflist
        ("00-multus.conf", {"name": "multus", "plugins": [{"type": "multus"}]}, "not a .conflist"),
        ("00-x.json", {"name": "x", "plugins": [{"type": "x"}]}, "not a .conflist"),
        # what libcni's ConfListFromBytes refuses
        ("f.conflist", {"plugins": [{"type": "bridge"}]}, "'name'"),
        ("f.conflist", {"name": 7, "plugins": [{"type": "bridge"}]}, "'name'"),
        ("f.conflist", {"name": "n", "cniVersion": 1, "plugins": [{"type": "bridge"}]}, "cniVersion"),
        ("f.conflist", {"name": "n"}, "'plugins'"),
        ("f.conflist", {"name": "n", "plugins": []}, "'plugins'"),
        ("f.conflist", {"name": "n", "plugins": "nope"}, "'plugins'"),
        ("f.conflist", {"name": "n", "type": "bridge"}, "'plugins'"),
        ("f.conflist", {"name": "n", "plugins": [{"type": "bridge"}, 7]}, "plugin 1"),
        ("f.conflist", {"name": "n", "plugins": [{"name": "no type"}]}, "plugin 0"),
        ("f.conf", {"name": "n", "type": ""}, "'type'"),
    ],
)
def test_what_libcni_does_not_load_is_no_network_config(name, doc, problem):
    assert cl.config_kind(name, doc) is None
    assert problem in cl.config_problem(name, doc)


@pytest.mark.parametrize("text", ["[1, 2]", '"x"'])
def test_non_object_refused(text):
    with pytest.raises(cl.ConfigError, match="expected a JSON object"):
        cl.parse_config("f.conf", text)


def test_entry_fields_and_never_block_namespace():
    e = PluginSettings(objects_dir="/var/lib/headrace/objects", backend="ebpf", iptables="nft",
                       exclude_namespaces=("kube-system", "istio-system")).entry()
    assert e == {
        "type": "headrace-cni",
        "objects_dir": "/var/lib/headrace/objects",
        "agent_socket": "/var/run/headrace/cni.sock",
        "backend": "ebpf",
        "iptables": "nft",
        "exclude_namespaces": ["kube-system", "istio-system", "headrace-system"],
        "log_file": "/var/run/headrace/cni.log",
        "log_level": "info",
    }
    assert PluginSettings(agent_namespace="mesh").entry()["exclude_namespaces"] == ["kube-system", "mesh"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"backend": "nope"},
        {"iptables": "x"},
        {"log_level": "trace"},
        {"objects_dir": "/a", "kubeconfig": "/b"},
        {"agent_socket": "relative.sock"},
        {"exclude_namespaces": ("Bad_NS",)},
    ],
)
def test_settings_validated(kwargs):
    with pytest.raises(SettingsError):
        PluginSettings(**kwargs)


def test_upsert_refuses_foreign_entry():
    with pytest.raises(ValueError, match="headrace-cni"):
        cl.upsert_entry({"plugins": []}, {"type": "bridge"})


def test_version_warning_for_versions_the_plugin_refuses():
    from cni.plugin.netconf import SUPPORTED_VERSIONS

    assert cl.version_warning(load("10-containerd-net.conflist"), SUPPORTED_VERSIONS) is None
    assert cl.version_warning(load("10-calico.conflist"), SUPPORTED_VERSIONS) is None
    warning = cl.version_warning(load("10-calico.conflist"), ("0.4.0", "1.0.0", "1.1.0"))
    assert warning is not None and "0.3.1" in warning
