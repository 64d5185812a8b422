"""The README's set-up on a fresh machine: a container of the bare Debian 12 root filesystem (minbase: no
compiler, no Python, no make) gets only what the README tells a user to install first (`make`), then runs
`make unit` as root in a clean copy of the repository — `scripts/setup.sh` (apt packages, kernel header
links, .venv, python-iptables compiled, generated gRPC code) followed by the unit tests.

Also: setup.sh prints a line per step, a second run installs nothing, and without root on a machine
that lacks packages it stops with a message naming them.

The container shares the host's network namespace (apt and pip need the network; nothing is configured
in it). Downloaded .debs and pip's cache live in the build dir, so a repeated run downloads little.
"""

from __future__ import annotations

import time

import pytest

from tests.image.conftest import report
from tests.image_support.debian_rootfs import build_dir
from tests.image_support.image_podman import ImagePodman, ca_mount_args, source_tree

pytestmark = [pytest.mark.image, pytest.mark.timeout(2400)]

#: What the README asks a user to install before its two commands.
README_PREREQUISITES = ("make",)


def test_readme_setup_on_a_bare_debian(image_podman: ImagePodman, base_image: str) -> None:
    cache = build_dir()
    src = source_tree(cache / "barebox-src")
    apt_cache = cache / "apt-archives"
    (apt_cache / "partial").mkdir(parents=True, exist_ok=True)
    pip_cache = cache / "pip-cache"
    pip_cache.mkdir(exist_ok=True)
    ca_volume, ca_env = ca_mount_args()
    script = " && ".join([
        "set -e",
        "! command -v gcc && ! command -v make && ! command -v python3",  # really bare
        "apt-get update -qq",
        f"apt-get install -y -qq --no-install-recommends {' '.join(README_PREREQUISITES)} >/dev/null",
        "cd /headrace",
        # not root and packages missing: a clear error naming them
        "(setpriv --reuid=65534 --regid=65534 --clear-groups bash scripts/setup.sh 2>/tmp/err; test $? -ne 0)",
        "grep -q 'missing packages:.*gcc' /tmp/err",
        "PYTEST_ADDOPTS='-q -p no:cacheprovider' make unit",
        "echo SECOND-RUN",
        "bash scripts/setup.sh",
    ])
    argv = [
        "run", "--rm", "--network=host", "--pull=never",
        "--volume", f"{src}:/headrace", "--volume", f"{apt_cache}:/var/cache/apt/archives",
        "--volume", f"{pip_cache}:/root/.cache/pip", *ca_volume,
        *[a for k, v in ca_env.items() for a in ("--env", f"{k}={v}")],
        "--env", "DEBIAN_FRONTEND=noninteractive",
        base_image, "/bin/bash", "-c", script,
    ]
    log = cache / "barebox.log"
    started = time.monotonic()
    image_podman.run(argv, timeout=2300, stream_to=log)
    took = time.monotonic() - started
    out = log.read_text(errors="replace")
    report(f"bare-box check (apt + setup.sh + unit tests in a bare Debian container): {took:.0f} s (log: {log})")
    first = out[: out.index("SECOND-RUN")]
    for step in ("[1/5] apt packages: installing", "[2/5]", "[3/5] .venv: pip install", "[4/5]", "[5/5]"):
        assert f"setup: {step}" in first, step
    assert " passed" in first and " failed" not in first
    second = out[out.index("SECOND-RUN"):]
    assert "setup: [1/5] apt packages: all" in second
    assert "setup: [3/5] .venv: headrace installed" in second
