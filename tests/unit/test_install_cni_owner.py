"""At termination, install-cni decides from the GET of its DaemonSet: uninstall when it is gone or being
deleted (or our identity is gone), keep on a rolling update, keep (and say so) when it cannot tell."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from node_agent.commands.install_cni import install_cni
from node_agent.install_cni.owner import KEEP, UNINSTALL, UNKNOWN, check_daemonset, daemonset_path, decide


def ds(**meta: object) -> bytes:
    return json.dumps({"kind": "DaemonSet", "metadata": {"name": "headrace-agent", **meta}}).encode()


@pytest.mark.parametrize(
    ("status", "body", "action"),
    [
        (200, ds(), KEEP),
        (200, ds(deletionTimestamp="2026-12-03T12:00:00Z"), UNINSTALL),
        (404, None, UNINSTALL),
        (401, None, UNINSTALL),
        (403, None, UNINSTALL),
        (500, None, UNKNOWN),
        (503, None, UNKNOWN),
        (200, b"not json", UNKNOWN),
        (200, b"[]", UNKNOWN),
        (None, None, UNKNOWN),
    ],
)
def test_decide(status: int | None, body: bytes | None, action: str) -> None:
    verdict = decide(status, body, "connection refused")
    assert verdict.action == action and verdict.reason
    assert verdict.uninstall == (action == UNINSTALL)


def test_path_is_quoted() -> None:
    assert daemonset_path("headrace-system", "headrace-agent") == \
        "/apis/apps/v1/namespaces/headrace-system/daemonsets/headrace-agent"
    assert daemonset_path("a/b", "c?d") == "/apis/apps/v1/namespaces/a%2Fb/daemonsets/c%3Fd"


def test_unusable_kubeconfig_or_unreachable_api_is_unknown(tmp_path) -> None:
    assert check_daemonset(str(tmp_path / "missing"), "ns", "ds").action == UNKNOWN
    kcfg = tmp_path / "kubeconfig"
    kcfg.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "t", "user": {"token": "x"}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
    }))
    verdict = check_daemonset(str(kcfg), "ns", "ds", timeout=2)
    assert verdict.action == UNKNOWN and "unreachable" in verdict.reason


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--owner-daemonset", "x", "--objects-dir", "/o"], "--owner-daemonset needs --watch"),
        (["--owner-daemonset", "x", "--watch", "--objects-dir", "/o"], "--owner-daemonset needs --watch"),
        (["--owner-daemonset", "x", "--watch", "--kubeconfig", "/k", "--uninstall-on-exit"], "not both"),
    ],
)
def test_cli_refuses_inconsistent_flags(args: list[str], error: str) -> None:
    result = CliRunner().invoke(install_cni, args)
    assert result.exit_code == 2 and error in result.output
