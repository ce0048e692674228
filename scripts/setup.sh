#!/usr/bin/env bash
# Installs what Baton's sandbox needs on a Debian machine, idempotently and fast when all is there:
# nats-server, etcd, the OCI registry, Prometheus and Go from Debian's packages, and kube-apiserver,
# kube-controller-manager and kube-scheduler built once from Debian's `kubernetes` source package
# and cached under ~/.cache/baton (override with BATON_KUBE_BIN_DIR).
set -euo pipefail

KUBE_VERSION_DEB="1.20.5+really1.20.2"
CACHE_DIR="${BATON_CACHE_DIR:-$HOME/.cache/baton}"
# The cache key names what the build changes in the source (see patch_kube_vendor).
KUBE_BIN_DIR="${BATON_KUBE_BIN_DIR:-$CACHE_DIR/kube-$KUBE_VERSION_DEB-reflect2-1.0.2/bin}"
KUBE_BINS=(kube-apiserver kube-controller-manager kube-scheduler)
PKGS=(nats-server etcd-server docker-registry prometheus golang-go golang-github-modern-go-reflect2-dev rsync jq ca-certificates openssl python3-venv curl)

log() { printf '[setup] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing_pkgs() {
  local p
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
  done
}

apt_updated=0
apt_update_once() {
  if [ "$apt_updated" -eq 0 ]; then
    log "apt-get update"
    as_root apt-get update -qq
    apt_updated=1
  fi
}

install_packages() {
  local missing
  missing=$(missing_pkgs | tr '\n' ' ')
  if [ -n "${missing// /}" ]; then
    apt_update_once
    log "installing Debian packages: $missing"
    # shellcheck disable=SC2086
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
  # Debian's packages start their services; the sandbox runs its own instances on random ports.
  local svc
  for svc in nats-server etcd docker-registry prometheus; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
      as_root systemctl disable --now "$svc" >/dev/null 2>&1 || true
    fi
  done
}

kube_bins_present() {
  local b
  for b in "${KUBE_BINS[@]}"; do
    [ -x "$KUBE_BIN_DIR/$b" ] || return 1
  done
}

ensure_deb_src() {
  if grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ || grep -qs '^deb-src' /etc/apt/sources.list; then
    return
  fi
  # Copy the machine's own Debian source (URIs, suites, components, keyring) as deb-src.
  local src
  src=$(grep -ls 'debian-archive-keyring\|deb.debian.org' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 || true)
  if [ -n "$src" ]; then
    awk 'BEGIN{RS=""; ORS="\n\n"} /URIs:/ && $0 !~ /security/ { gsub(/Types: deb/, "Types: deb-src"); print }' "$src" \
      | as_root tee /etc/apt/sources.list.d/baton-deb-src.sources >/dev/null
  else
    grep -E '^deb ' /etc/apt/sources.list | grep -v security | sed 's/^deb /deb-src /' \
      | as_root tee /etc/apt/sources.list.d/baton-deb-src.list >/dev/null
  fi
  apt_updated=0
}

# Kubernetes 1.20 vendors reflect2 1.0.1, whose map iteration does not match Go 1.18 and later:
# built with Debian's Go, the API server crashes (SIGSEGV) on its first custom resource. Debian's
# reflect2 1.0.2 is the fix; it replaces the vendored copy.
patch_kube_vendor() {
  local vendored=vendor/github.com/modern-go/reflect2 debian=/usr/share/gocode/src/github.com/modern-go/reflect2
  grep -q 'github.com/modern-go/reflect2 v1.0.1' vendor/modules.txt || return 0
  [ -f "$debian/reflect2.go" ] || { log "missing $debian (golang-github-modern-go-reflect2-dev)"; return 1; }
  rm -rf "$vendored" && mkdir -p "$vendored"
  find "$debian" -maxdepth 1 -type f -name '*.go' ! -name '*_test.go' -exec cp {} "$vendored/" \;
  [ -f "$debian/go.mod" ] && cp "$debian/go.mod" "$vendored/"
  sed -i 's|github.com/modern-go/reflect2 v1.0.1|github.com/modern-go/reflect2 v1.0.2|g' vendor/modules.txt go.mod
}

build_kube() {
  kube_bins_present && return
  log "building kube-apiserver, kube-controller-manager, kube-scheduler from Debian's kubernetes source (once, ~5 min)"
  ensure_deb_src
  apt_update_once
  local work="$CACHE_DIR/kube-src"
  rm -rf "$work" && mkdir -p "$work"
  (
    cd "$work"
    apt-get source --download-only "kubernetes=$KUBE_VERSION_DEB" >/dev/null 2>&1 \
      || apt-get source --download-only kubernetes >/dev/null
    local orig
    orig=$(ls kubernetes_*.orig.tar.* | head -n1)
    mkdir src && tar -xf "$orig" -C src --strip-components=1
    cd src
    patch_kube_vendor
    mkdir -p .go/src/k8s.io
    ln -sfn ../../.. .go/src/k8s.io/kubernetes
    cd .go/src/k8s.io/kubernetes
    GOPATH="$work/src/.go" GOFLAGS=-mod=vendor CGO_ENABLED=0 GO111MODULE=on \
      make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" >"$work/build.log" 2>&1 \
      || { tail -n 40 "$work/build.log" >&2; exit 1; }
    mkdir -p "$KUBE_BIN_DIR"
    local b
    for b in "${KUBE_BINS[@]}"; do
      install -m 0755 "_output/local/bin/linux/$(go env GOARCH)/$b" "$KUBE_BIN_DIR/$b" 2>/dev/null \
        || install -m 0755 "$(find _output -type f -name "$b" | head -n1)" "$KUBE_BIN_DIR/$b"
    done
  )
  rm -rf "$work"
  log "kube binaries cached in $KUBE_BIN_DIR"
}

# docker-compose 1.29 from PyPI validates compose.yaml (`config`) without a Docker engine.
COMPOSE_VENV="$CACHE_DIR/compose-venv"
install_compose_validator() {
  [ -x "$COMPOSE_VENV/bin/docker-compose" ] && return
  log "installing the compose validator (docker-compose 1.29) into $COMPOSE_VENV"
  rm -rf "$COMPOSE_VENV"
  python3 -m venv "$COMPOSE_VENV"
  "$COMPOSE_VENV/bin/pip" install -q 'cython<3' wheel
  "$COMPOSE_VENV/bin/pip" install -q 'pyyaml==5.4.1' --no-build-isolation
  "$COMPOSE_VENV/bin/pip" install -q 'docker-compose==1.29.2'
}

# kubectl renders deploy/ (kustomize) and asks for ServiceAccount tokens in the install test;
# Debian's kubernetes-client when there is none.
install_kubectl() {
  command -v kubectl >/dev/null 2>&1 && return
  apt_update_once
  log "installing kubectl (Debian's kubernetes-client)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
}

install_packages
install_kubectl
install_compose_validator
if [ -z "${BATON_KUBE_BIN_DIR:-}" ] || ! kube_bins_present; then
  build_kube
fi
