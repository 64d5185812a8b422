#!/usr/bin/env bash
# One idempotent set-up for a fresh Debian 12 machine (root): system packages, the kernel header links
# bcc needs, a .venv (Debian's python3) with headrace installed editable, bcc exposed to the venv, and
# the generated gRPC code. Used by `make test`, `make lab`, `.ci/run` and the Vagrant provisioner.
# Prints one line per step (what it checks or installs); exits non-zero with a message naming what is
# missing. A second run that finds everything in place installs nothing and takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo "setup: $*"; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }

APT_PACKAGES=(
  iptables nftables conntrack iproute2 util-linux procps
  containernetworking-plugins podman runc containerd
  gcc libc6-dev make mmdebstrap
  bpftool clang python3-bpfcc linux-headers-amd64 python3-nftables
  python3 python3-venv python3-dev socat ruby strace
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null && command -v dpkg-query >/dev/null \
    || die "apt-get/dpkg not found: this set-up needs Debian 12 (bookworm); missing packages: ${missing[*]}"
  [ "$(id -u)" = 0 ] || die "missing packages: ${missing[*]}; run as root (or install them first)"
  step "[1/5] apt packages: installing ${#missing[@]}: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  step "      apt-get update"
  apt-get update -o Dpkg::Use-Pty=0 \
    || die "apt-get update failed (network or /etc/apt/sources.list?); still missing: ${missing[*]}"
  step "      apt-get install (downloads and unpacks; a fresh machine takes a few minutes)"
  apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0 "${missing[@]}" \
    || die "apt-get install failed; still missing: $(for p in "${missing[@]}"; do
         dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || printf '%s ' "$p"; done)"
else
  step "[1/5] apt packages: all ${#APT_PACKAGES[@]} present"
fi

# bcc compiles against a kernel header tree at /lib/modules/$(uname -r)/{build,source}. On kernels
# without a matching package (this VM's custom kernel), point them at Debian's generic amd64 headers.
kver=$(uname -r)
step "[2/5] kernel headers for bcc: /lib/modules/$kver/build"
if [ ! -e "/lib/modules/$kver/build" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1 || true)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1 || true)
  if [ -n "$hdr" ] && [ -n "$common" ]; then
    mkdir -p "/lib/modules/$kver"
    ln -sfn "$hdr" "/lib/modules/$kver/build"
    ln -sfn "$common" "/lib/modules/$kver/source"
  fi
fi

# The venv uses Debian's interpreter: readable and executable by the proxy uid (1337) in tests, and
# the one python3-bpfcc is built for.
/usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
  || die "/usr/bin/python3 (Debian's python3 package) missing or older than 3.11"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.base_prefix != "/usr")'; then
  step "[3/5] .venv: creating it with /usr/bin/python3"
  rm -rf .venv
  /usr/bin/python3 -m venv .venv || die "python3 -m venv failed (is python3-venv installed?)"
fi
stamp=.venv/.headrace-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  step "[3/5] .venv: pip install -e '.[dev]' (headrace and its Python dependencies; python-iptables is compiled)"
  .venv/bin/pip install -q --progress-bar off --upgrade pip || die "pip could not reach the package index"
  .venv/bin/pip install --progress-bar off -e '.[dev]' 2>&1 | grep -v -e '^Requirement already satisfied' \
    || true
  .venv/bin/python -c 'import iptc, grpc, kubernetes, pyroute2, click' 2>/dev/null \
    || die "pip install -e '.[dev]' failed (see above): headrace's Python dependencies are missing"
  touch "$stamp"
else
  step "[3/5] .venv: headrace installed (pyproject.toml unchanged)"
fi

step "[4/5] bcc and nftables exposed to the .venv"
# Expose only the bcc package from dist-packages (all of dist-packages would shadow pip's pyroute2).
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$site/_headrace_bcc"
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/_headrace_bcc/bcc"
echo "$site/_headrace_bcc" > "$site/headrace_bcc.pth"
# The same for libnftables' Python binding (the agent's nftables backend applies rules in-process).
mkdir -p "$site/_headrace_nftables"
ln -sfn /usr/lib/python3/dist-packages/nftables "$site/_headrace_nftables/nftables"
echo "$site/_headrace_nftables" > "$site/headrace_nftables.pth"

# Generated gRPC code (never hand-edited, never committed).
step "[5/5] generated gRPC code (make proto), headrace-cni's compiled front (make front)"
make -s proto front
