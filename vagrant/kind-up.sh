#!/usr/bin/env bash
# Optional lab step (Vagrant provisioner "kind", or by hand as root inside the VM): a kind cluster
# with kindnet, the headrace image built from this checkout, headrace deployed with kustomize, and
# a check that every node's conflist ends with headrace-cni and the installed plugin runs there
# (kind nodes have no Python: it runs on the runtime install-cni copied).
set -euo pipefail
cd "$(dirname "$0")/.."

KIND_VERSION="${KIND_VERSION:-v0.23.0}"
KUBECTL_VERSION="${KUBECTL_VERSION:-v1.30.2}"
CLUSTER="headrace"
IMAGE="ghcr.io/headrace/headrace:0.1.0"   # deploy/kustomization.yaml: images

export DEBIAN_FRONTEND=noninteractive
if ! command -v docker >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends docker.io curl ca-certificates >/dev/null
fi
if ! command -v kind >/dev/null; then
  curl -fsSLo /usr/local/bin/kind "https://kind.sigs.k8s.io/dl/${KIND_VERSION}/kind-linux-amd64"
  chmod 0755 /usr/local/bin/kind
fi
if ! command -v kubectl >/dev/null; then
  curl -fsSLo /usr/local/bin/kubectl "https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/amd64/kubectl"
  chmod 0755 /usr/local/bin/kubectl
fi

echo "kind-up: building ${IMAGE}"
docker build -q -f deploy/Containerfile -t "${IMAGE}" .

if ! kind get clusters 2>/dev/null | grep -qx "${CLUSTER}"; then
  echo "kind-up: creating cluster ${CLUSTER}"
  kind create cluster --name "${CLUSTER}" --config vagrant/kind-config.yaml --wait 180s
fi
kind load docker-image "${IMAGE}" --name "${CLUSTER}"

echo "kind-up: deploying headrace (kubectl apply -k deploy)"
kubectl apply -k deploy
kubectl -n headrace-system rollout status daemonset/headrace-agent --timeout=300s

for node in $(kind get nodes --name "${CLUSTER}"); do
  conflist=$(docker exec "${node}" sh -c 'ls /etc/cni/net.d/*.conflist | sort | head -n1')
  docker exec "${node}" cat "${conflist}" | grep -q '"type": "headrace-cni"' \
    || { echo "kind-up: ${node}: ${conflist} has no headrace-cni entry" >&2; exit 1; }
  docker exec -e CNI_COMMAND=VERSION "${node}" /opt/cni/bin/headrace-cni </dev/null \
    || { echo "kind-up: ${node}: the installed plugin does not run" >&2; exit 1; }
  echo "kind-up: ${node}: ${conflist} chains headrace-cni; plugin runs"
done
echo "kind-up: done. Try: kubectl label namespace default istio.io/dataplane-mode=ambient"
