"""Pure parts of the podman test support and of the ADD latency bench (no root, no podman)."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from bench.cni_add_latency import Samples, percentile, ratio, result_rows, table
from tests.podman_support.isolated import DEFAULT_ULIMITS, PodmanPaths, containers_conf_text, storage_conf_text
from tests.podman_support.pods import parse_cni_args, pod_object, write_pod_object
from tests.podman_support.rootfs import RootfsError, bash_tcp_client, parse_ldd

LDD = """\tlinux-vdso.so.1 (0x00007fee025a7000)
\tlibtinfo.so.6 => /lib/x86_64-linux-gnu/libtinfo.so.6 (0x00007fee02422000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fee02240000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007fee025a9000)
"""


def test_parse_ldd_lists_libraries_and_loader() -> None:
    assert parse_ldd(LDD) == [
        "/lib/x86_64-linux-gnu/libtinfo.so.6",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2",
    ]


def test_parse_ldd_missing_library_is_an_error() -> None:
    with pytest.raises(RootfsError, match="missing library"):
        parse_ldd("\tlibfoo.so.1 => not found\n")


def test_bash_client_passes_values_as_arguments() -> None:
    argv = bash_tcp_client("fd00::1", 8080, "a'b; rm -rf /")
    assert argv[:2] == ["/bin/bash", "-c"]
    assert "fd00::1" not in argv[2] and "rm" not in argv[2]
    assert argv[-3:] == ["fd00::1", "8080", "a'b; rm -rf /"]
    with pytest.raises(ValueError):
        bash_tcp_client("1.2.3.4; reboot", 80, "")
    with pytest.raises(ValueError):
        bash_tcp_client("1.2.3.4", 0, "")


def test_containers_conf_isolates_everything(tmp_path: Path) -> None:
    paths = PodmanPaths(tmp_path / "base", tmp_path / "s")
    conf = tomllib.loads(containers_conf_text(paths, ["/usr/lib/cni", "/x/bin"], DEFAULT_ULIMITS))
    assert conf["network"] == {
        "network_backend": "cni",
        "cni_plugin_dirs": ["/usr/lib/cni", "/x/bin"],
        "network_config_dir": str(paths.net_dir),
    }
    engine = conf["engine"]
    assert engine["cgroup_manager"] == "cgroupfs" and engine["events_logger"] == "file"
    assert engine["runtime"] == "runc" and engine["lock_type"] == "file"
    for key in ("tmp_dir", "static_dir", "volume_path", "events_logfile_path"):
        assert str(engine[key]).startswith(str(tmp_path)), key
    for limit in conf["containers"]["default_ulimits"]:
        soft, hard = limit.split("=")[1].split(":")
        assert int(soft) <= int(hard) < 20000
    storage = tomllib.loads(storage_conf_text(paths))["storage"]
    assert storage["driver"] == "vfs" and storage["runroot"].startswith(str(tmp_path))


def test_pod_object_and_cni_args(tmp_path: Path) -> None:
    obj = pod_object("default", "web", annotations={"sidecar.istio.io/status": "{}"})
    path = write_pod_object(tmp_path, obj)
    assert path.name == "pod-default-web.json"
    assert parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=c1;K8S_POD_NAMESPACE=shop") == {
        "IgnoreUnknown": "1",
        "K8S_POD_NAME": "c1",
        "K8S_POD_NAMESPACE": "shop",
    }


def test_bench_statistics() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    assert math.isnan(percentile([], 50))
    assert ratio([0.02, 0.04], [0.02]) == "1.50"
    s = Samples()
    samples = [("bridge", "ADD", 0.010), ("headrace-cni", "ADD", 0.005), ("headrace-cni", "STATUS", 0.002)]
    for plugin, cmd, sec in samples:
        s.add(plugin, cmd, sec)
    rows = result_rows({("nft", "up", "sidecar"): s})
    assert rows[0][:9] == ["nft", "up", "sidecar", "1", "10.0", "10.0", "5.0", "5.0", "0.50"]
    assert rows[0][-1] == "2.0"
    out = table(rows, ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"])
    assert out.splitlines()[1].startswith("|---")
