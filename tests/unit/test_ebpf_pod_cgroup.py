"""The kubelet's pod cgroup path from uid + QoS class, both drivers, all three classes (pure), and the
QoS class of a Pod object."""

from __future__ import annotations

from pathlib import Path

import pytest
from node_agent.backends.ebpf import pod_cgroup as pc

UID = "0f6bd2c3-58d4-4b6a-9d39-3a2c8e4f1b7a"
U_ = "0f6bd2c3_58d4_4b6a_9d39_3a2c8e4f1b7a"


@pytest.mark.parametrize(
    ("qos", "driver", "want"),
    [
        ("guaranteed", "cgroupfs", f"kubepods/pod{UID}"),
        ("burstable", "cgroupfs", f"kubepods/burstable/pod{UID}"),
        ("besteffort", "cgroupfs", f"kubepods/besteffort/pod{UID}"),
        ("guaranteed", "systemd", f"kubepods.slice/kubepods-pod{U_}.slice"),
        ("burstable", "systemd", f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice"),
        ("besteffort", "systemd", f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{U_}.slice"),
    ],
)
def test_relative_dirs(qos, driver, want):
    assert pc.relative_dirs(UID, qos, driver) == (want,)


@pytest.mark.parametrize(("uid", "qos", "driver"), [("../x", "burstable", "systemd"), ("", "burstable", "cgroupfs"),
                                                     (UID, "Gold", "cgroupfs"), (UID, "burstable", "openrc")])
def test_bad_inputs_are_refused(uid, qos, driver):
    with pytest.raises(ValueError):
        pc.relative_dirs(uid, qos, driver)


def test_candidates_all_classes_when_unknown_and_every_root():
    roots = [Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/kubelet.slice")]
    got = pc.candidates(UID, None, roots)
    assert len(got) == 2 * 2 * 3 and len(set(got)) == 12
    assert Path(f"/sys/fs/cgroup/kubelet.slice/kubepods/besteffort/pod{UID}") in got
    assert pc.candidates(UID, "guaranteed", roots[:1]) == [
        Path(f"/sys/fs/cgroup/kubepods/pod{UID}"), Path(f"/sys/fs/cgroup/kubepods.slice/kubepods-pod{U_}.slice")]


def _pod(*resources, qos=None, init=()):
    obj = {"spec": {"containers": [{"name": f"c{i}", "resources": r} for i, r in enumerate(resources)],
                    "initContainers": [{"name": "i", "resources": r} for r in init]}}
    if qos:
        obj["status"] = {"qosClass": qos}
    return obj


FULL = {"limits": {"cpu": "1", "memory": "1Gi"}}


@pytest.mark.parametrize(
    ("pod", "want"),
    [
        (_pod(FULL, qos="Burstable"), "burstable"),  # status wins
        (_pod({}, qos="BestEffort"), "besteffort"),
        (_pod(FULL), "guaranteed"),  # requests default to limits
        (_pod({"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "1", "memory": "1Gi"}}), "guaranteed"),
        (_pod(FULL, {}), "burstable"),  # a second container without limits
        (_pod({"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "500m"}}), "burstable"),
        (_pod({"requests": {"memory": "64Mi"}}), "burstable"),
        (_pod({}, {}), "besteffort"),
        (_pod(FULL, init=[{"requests": {"cpu": "1"}}]), "burstable"),
        ({"spec": {}}, "besteffort"),
        ({"spec": "junk", "status": "junk"}, "besteffort"),
    ],
)
def test_qos_class(pod, want):
    assert pc.qos_class(pod) == want


def test_default_roots_from_env_or_mountinfo():
    assert pc.default_roots({pc.ROOTS_ENV: "/a:/b/c"}) == [Path("/a"), Path("/b/c")]
    mi = ("30 1 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
          "35 30 0:30 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
          "36 30 0:31 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n")
    assert pc.default_roots({}, mi) == [Path("/sys/fs/cgroup/unified")]


def test_find_picks_the_existing_dir(tmp_path):
    assert pc.find(UID, None, [tmp_path]) is None
    d = tmp_path / f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{U_}.slice"
    d.mkdir(parents=True)
    assert pc.find(UID, None, [tmp_path]) == d
    assert pc.find(UID, "besteffort", [tmp_path]) == d
    assert pc.find(UID, "guaranteed", [tmp_path]) is None
    assert pc.find("../etc", None, [tmp_path]) is None
