"""The image builds from `deploy/Containerfile` without any registry and works.

The base is a Debian 12 root filesystem made from packages (mmdebstrap), imported with `podman import`;
`podman build` runs both stages on it (compilers in the build stage only). Smoke test: `headrace
--version`, `headrace install-cni` into a temporary host root, and the installed plugin answering
VERSION in a container of the bare base image, which has no Python at all (a node like kind's).
The image's size is printed; the lean rules (no docs, apt lists, pip, compiler) are checked.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.image.conftest import report
from tests.image_support.debian_rootfs import build_dir
from tests.image_support.image_podman import IMAGE, ImagePodman, ca_mount_args, source_tree

# the first test pays for the image build (fixture): about 5 minutes from scratch here, seconds when cached
pytestmark = [pytest.mark.image, pytest.mark.timeout(2400)]

#: The image is big mostly because of bcc (LLVM/clang libraries); this bound catches a regression such as
#: a compiler or the build venv leaking into the runtime stage.
MAX_IMAGE_MB = 700

BRIDGE_CONFLIST = {
    "cniVersion": "1.0.0",
    "name": "k8s-pod-network",
    "plugins": [
        {"type": "bridge", "bridge": "cni0", "isGateway": True,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]]}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}


@pytest.fixture(scope="session")
def headrace_image(image_podman: ImagePodman, base_image: str) -> str:
    context = source_tree(build_dir() / "context")
    ca_volume, ca_env = ca_mount_args()
    args = [
        "build", "--pull=never", "--network=host", "--layers", "-f", str(context / "deploy" / "Containerfile"),
        "--build-arg", f"BASE={base_image}", *ca_volume,
        *(["--build-arg", f"PIP_CERT={ca_env['PIP_CERT']}"] if ca_env else []),
        "-t", IMAGE, str(context),
    ]
    started = time.monotonic()
    image_podman.run(args, timeout=1800, stream_to=build_dir() / "image-build.log")
    report(f"image {IMAGE}: podman build {time.monotonic() - started:.0f} s, "
           f"size {image_podman.image_size(IMAGE) / 1e6:.1f} MB (log: {build_dir() / 'image-build.log'})")
    return IMAGE


def run_image(pm: ImagePodman, image: str, *args: str, entrypoint: str | None = None,
              volumes: tuple[str, ...] = (), env: tuple[str, ...] = (), stdin: str | None = None) -> str:
    argv = ["run", "--rm", "--network=none", "--pull=never"]
    if stdin is not None:
        argv.append("-i")
    for v in volumes:
        argv += ["--volume", v]
    for e in env:
        argv += ["--env", e]
    if entrypoint is not None:
        argv += ["--entrypoint", entrypoint]
    return pm.run([*argv, image, *args], input=stdin, timeout=300).stdout


def node_image(pm: ImagePodman, base_image: str, tmp_path: Path) -> str:
    """A node's root filesystem: the Debian base with libexpat (zlib and glibc are already there)."""
    tag = "localhost/headrace-node:test"
    if not pm.has_image(tag):
        (tmp_path / "Containerfile.node").write_text(
            f"FROM {base_image}\nRUN apt-get update -qq && apt-get install -y -qq --no-install-recommends "
            "libexpat1 >/dev/null && rm -rf /var/lib/apt/lists/*\n")
        pm.run(["build", "--pull=never", "--network=host", "-f", str(tmp_path / "Containerfile.node"), "-t", tag,
                str(tmp_path)], timeout=600)
    return tag


def test_version(image_podman: ImagePodman, headrace_image: str) -> None:
    assert run_image(image_podman, headrace_image, "--version").strip() == "headrace, version 0.1.0"


def test_image_is_lean(image_podman: ImagePodman, headrace_image: str) -> None:
    size_mb = image_podman.image_size(headrace_image) / 1e6
    assert size_mb < MAX_IMAGE_MB, f"image is {size_mb:.0f} MB"
    script = (
        "set -e; "
        "echo docs=$(find /usr/share/doc -type f ! -name copyright | wc -l); "
        "echo man=$(find /usr/share/man -type f 2>/dev/null | wc -l); "
        "echo lists=$(find /var/lib/apt/lists -type f ! -name lock 2>/dev/null | wc -l); "
        "echo debs=$(find /var/cache/apt -name '*.deb' | wc -l); "
        "echo gcc=$(command -v gcc cc x86_64-linux-gnu-gcc | wc -l); "
        "echo pip=$(ls /opt/venv/bin | grep -c '^pip' || true); "
        "echo pycache_outside=$(find / -xdev -name __pycache__ -path '/src/*' | wc -l)"
    )
    out = run_image(image_podman, headrace_image, "-c", script, entrypoint="/bin/sh")
    facts = dict(line.split("=", 1) for line in out.split())
    assert facts == {"docs": "0", "man": "0", "lists": "0", "debs": "0", "gcc": "0", "pip": "0",
                     "pycache_outside": "0"}, out


def test_runtime_tools_present(image_podman: ImagePodman, headrace_image: str) -> None:
    script = "set -e; for t in iptables-save iptables-legacy-save nft ip nsenter conntrack bpftool ldd; do " \
             "command -v $t >/dev/null || { echo missing $t; exit 1; }; done; " \
             "python -c 'import bcc, nftables, iptc, grpc, prometheus_client, kubernetes.client, kubernetes.config, " \
             "kubernetes.watch, node_agent.sources.kubernetes, node_agent.agent.daemon; print(\"ok\")'"
    assert run_image(image_podman, headrace_image, "-c", script, entrypoint="/bin/sh").strip() == "ok"


def test_the_ebpf_compile_runs_as_the_agents_child(image_podman: ImagePodman, headrace_image: str) -> None:
    """The agent compiles the eBPF object in a child of its own interpreter (bcc and LLVM never enter it):
    in the image that child starts, and without the node's kernel headers (mounted on a node) it answers
    with the toolchain's reason, which the agent raises; bcc was never imported by the agent."""
    script = (
        "import sys; from node_agent.backends.ebpf import loader\n"
        "try:\n    loader.compile_object()\n    print('compiled')\n"
        "except loader.ToolchainError as e:\n    print('refused:', e)\n"
        "print('bcc imported:', 'bcc' in sys.modules)"
    )
    out = run_image(image_podman, headrace_image, "-c", script, entrypoint="/opt/venv/bin/python")
    assert "refused: kernel headers missing" in out and "bcc imported: False" in out, out


def test_install_cni_into_host_root_and_plugin_answers(
    image_podman: ImagePodman, headrace_image: str, base_image: str, tmp_path: Path
) -> None:
    host = tmp_path / "host"
    conf_dir = host / "etc" / "cni" / "net.d"
    conf_dir.mkdir(parents=True)
    (conf_dir / "10-bridge.conflist").write_text(json.dumps(BRIDGE_CONFLIST, indent=2))
    out = run_image(
        image_podman, headrace_image, "install-cni", "--host-root=/host", "--objects-dir=/var/lib/headrace/objects",
        volumes=(f"{host}:/host",),
    )
    assert json.loads(out.strip().splitlines()[-1])["action"] == "inserted"
    conflist = json.loads((conf_dir / "10-bridge.conflist").read_text())
    assert conflist["plugins"][:-1] == BRIDGE_CONFLIST["plugins"]
    assert conflist["plugins"][-1]["type"] == "headrace-cni"
    launcher = host / "opt" / "cni" / "bin" / "headrace-cni"
    first_line = launcher.read_text().splitlines()[0]
    # the image carries the compiled front: the launcher's #! line names it and the agent socket
    assert first_line.startswith("#!/opt/headrace/runtime-")
    assert first_line.endswith("/bin/headrace-cni-front /var/run/headrace/cni.sock"), first_line

    # A node without Python: the bare Debian base plus the libraries install-cni says the host must
    # provide (host-libraries.json) runs the launcher on the runtime install-cni copied.
    runtime = next((host / "opt" / "headrace").glob("runtime-*"))
    needed = json.loads((runtime / "host-libraries.json").read_text())
    names = {Path(str(lib)).name for lib in needed}  # soname -> path in the image
    assert {"libc.so.6", "libexpat.so.1"} <= names <= {"libc.so.6", "libm.so.6", "libz.so.1", "libexpat.so.1",
                                                       "ld-linux-x86-64.so.2", "linux-vdso.so.1"}, names
    node = node_image(image_podman, base_image, tmp_path)
    no_python = run_image(image_podman, node, "-c", "command -v python3 python || echo none", entrypoint="/bin/sh")
    assert no_python.strip() == "none"
    reply = run_image(
        image_podman, node, entrypoint="/opt/cni/bin/headrace-cni",
        volumes=(f"{host}/opt/headrace:/opt/headrace:ro", f"{host}/opt/cni/bin:/opt/cni/bin:ro"),
        env=("CNI_COMMAND=VERSION",), stdin=json.dumps({"cniVersion": "1.0.0"}),
    )
    version = json.loads(reply)
    assert "1.0.0" in version["supportedVersions"] and "0.3.1" in version["supportedVersions"]
