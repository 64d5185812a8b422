#!/usr/bin/env bash
# One idempotent set-up for a fresh Debian 12 machine (root): system packages, the kernel header links
# bcc needs, a .venv (Debian's python3) with headrace installed editable, bcc exposed to the venv, and
# the generated gRPC code. Used by `make test`, `make lab`, `.ci/run` and the Vagrant provisioner.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  iptables nftables conntrack iproute2 util-linux procps
  containernetworking-plugins podman runc containerd
  bpftool clang python3-bpfcc linux-headers-amd64 python3-nftables
  python3 python3-venv python3-dev socat ruby
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc compiles against a kernel header tree at /lib/modules/$(uname -r)/{build,source}. On kernels
# without a matching package (this VM's custom kernel), point them at Debian's generic amd64 headers.
kver=$(uname -r)
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
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.base_prefix != "/usr")'; then
  rm -rf .venv
  /usr/bin/python3 -m venv .venv
fi
stamp=.venv/.headrace-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi

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
make -s proto
