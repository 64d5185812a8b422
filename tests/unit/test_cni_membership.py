"""A pod's dataplane mode (cni.contract.membership)."""

from __future__ import annotations

import pytest

from cni.contract.membership import namespace_needed, pod_mode

SIDECAR = {"sidecar.istio.io/status": "{}"}
AMB = {"istio.io/dataplane-mode": "ambient"}
OPT_OUT = {"istio.io/dataplane-mode": "none"}


@pytest.mark.parametrize(
    ("ns", "labels", "annotations", "host", "ns_labels", "mode"),
    [
        ("shop", {}, SIDECAR, False, None, "sidecar"),
        ("shop", AMB, {}, False, None, "ambient"),
        ("shop", {}, {}, False, AMB, "ambient"),
        ("shop", OPT_OUT, {}, False, AMB, "none"),
        ("shop", AMB, SIDECAR, False, AMB, "sidecar"),  # an injected pod keeps its sidecar
        ("shop", {}, {}, False, {}, "none"),
        ("shop", {}, {}, False, {"istio.io/dataplane-mode": "other"}, "none"),
        ("kube-system", AMB, SIDECAR, False, AMB, "none"),
        ("shop", AMB, SIDECAR, True, AMB, "none"),  # hostNetwork
        # interceptionMode NONE: no redirection at all (not even ambient)
        ("shop", {}, {**SIDECAR, "sidecar.istio.io/interceptionMode": "NONE"}, False, None, "none"),
        ("shop", AMB, {**SIDECAR, "sidecar.istio.io/interceptionMode": "NONE"}, False, AMB, "none"),
        ("shop", {}, {**SIDECAR, "sidecar.istio.io/interceptionMode": "none"}, False, None, "sidecar"),
        ("shop", {}, {**SIDECAR, "sidecar.istio.io/interceptionMode": "TPROXY"}, False, None, "sidecar"),
    ],
)
def test_pod_mode(ns, labels, annotations, host, ns_labels, mode) -> None:
    assert pod_mode(ns, labels, annotations, host, ns_labels) == mode


def test_custom_exclusions() -> None:
    assert pod_mode("infra", {}, SIDECAR, False, None, ["infra"]) == "none"
    assert pod_mode("kube-system", {}, SIDECAR, False, None, []) == "sidecar"


def test_namespace_needed_only_when_it_can_matter() -> None:
    assert namespace_needed("shop", {}, {}, False)
    assert not namespace_needed("shop", {}, SIDECAR, False)
    assert not namespace_needed("shop", AMB, {}, False)
    assert not namespace_needed("shop", OPT_OUT, {}, False)
    assert not namespace_needed("kube-system", {}, {}, False)
    assert not namespace_needed("shop", {}, {}, True)
