"""Fixtures of the image tests: one podman (storage cached in the build dir) and the Debian base image
made from packages, shared by every test of the session."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.image_support.debian_rootfs import RootfsBuildError, build_dir, cache_key, debian_rootfs_tar
from tests.image_support.image_podman import BASE_IMAGE, ImagePodman, ImagePodmanError

IMAGE_DIR = Path(__file__).parent
REQUIRE_ENV = "HEADRACE_REQUIRE_PODMAN"  # CI: a podman or mmdebstrap that cannot run is a failure


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if IMAGE_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.image)


def skip_or_fail(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1)")
    pytest.skip(reason)


REPORT: list[str] = []


def report(line: str) -> None:
    """A line for the run's summary (the sizes and times CI should show), printed even with capture on."""
    REPORT.append(line)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT:
        terminalreporter.section("image build and bare-box check")
        for line in REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def image_podman() -> Iterator[ImagePodman]:
    if os.geteuid() != 0:
        skip_or_fail("the image tests need root (mmdebstrap --mode=root, podman)")
    for binary in ("podman", "runc", "mmdebstrap"):
        if shutil.which(binary) is None:
            skip_or_fail(f"{binary} is not installed (scripts/setup.sh installs it)")
    pm = ImagePodman(build_dir() / "podman")
    yield pm
    pm.close()


@pytest.fixture(scope="session")
def base_image(image_podman: ImagePodman) -> str:
    """The Debian root filesystem, imported once per cache key (`localhost/headrace-debian:bookworm-KEY`)."""
    tag = f"{BASE_IMAGE}-{cache_key()}"
    if image_podman.has_image(tag):
        return tag
    try:
        tar, took = debian_rootfs_tar()
    except RootfsBuildError as exc:
        skip_or_fail(str(exc))
        raise
    started = time.monotonic()
    try:
        image_podman.run(["import", "--change", "CMD [\"/bin/bash\"]", str(tar), tag], timeout=300)
    except ImagePodmanError as exc:
        skip_or_fail(f"podman cannot import the base root filesystem: {exc}")
    report(f"base root filesystem: mmdebstrap {took:.0f} s, podman import {time.monotonic() - started:.0f} s, "
           f"{image_podman.image_size(tag) / 1e6:.1f} MB")
    return tag
