#!/usr/bin/env bash
# The container images, built with podman from deploy/images/Containerfile*
# (no registry needed: the build stages' outputs are made here and passed in
# with --build-context, see the Containerfiles' headers).
#
#   scripts/images.sh install     podman and buildah from Debian, when missing
#   scripts/images.sh build [--cp-binary PATH] [--wasm PATH] [--tag TAG] [--out DIR]
#
# build makes
#   localhost/apitokens/control-plane:TAG  ghcr.io/apitokens/control-plane:TAG
#   localhost/apitokens/filter:TAG         ghcr.io/apitokens/filter:TAG
# and writes them to DIR (default target/images):
#   control-plane.tar  docker-archive (the Docker format keeps the HEALTHCHECK,
#                      which an OCI image config has no field for)
#   filter.tar         oci-archive (one gzip layer, plugin.wasm, and the
#                      annotation module.wasm.image/variant=compat: what an
#                      Istio WasmPlugin's oci:// URL reads)
# Without --cp-binary / --wasm it compiles the release builds first
# (`make images`); TAG defaults to the crates' version. `make test` passes
# target/debug/apitokens instead (tests/deploy/test_images.py): the same layout
# and instructions, only the binary differs (the debug profile, stripped here
# like the release one is by its profile).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
images=$repo/deploy/images
cargo=${CARGO:-cargo}
# The images' org.opencontainers.image.source label (deploy/images/Containerfile*).
source=https://github.com/apitokens/apitokens

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_tools() {
  if ! command -v podman >/dev/null || ! command -v buildah >/dev/null; then
    echo "images.sh: installing podman and buildah from Debian (once)" >&2
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq podman buildah >&2
  fi
}

version() { awk -F'"' '/^version = /{print $2; exit}' "$repo/control-plane/Cargo.toml"; }

build_images() {
  local cp_binary="" wasm="" tag="" out="$repo/target/images"
  while [ $# -gt 0 ]; do
    case $1 in
      --cp-binary) cp_binary=$2; shift 2 ;;
      --wasm) wasm=$2; shift 2 ;;
      --tag) tag=$2; shift 2 ;;
      --out) out=$2; shift 2 ;;
      *) echo "images.sh: unknown option $1" >&2; exit 2 ;;
    esac
  done
  local version; version=$(version)
  tag=${tag:-$version}
  local target_dir=${CARGO_TARGET_DIR:-$repo/target}
  if [ -z "$cp_binary" ]; then
    (cd "$repo" && $cargo build --release --locked -p apitokens-control-plane)
    cp_binary=$target_dir/release/apitokens
  fi
  if [ -z "$wasm" ]; then
    (cd "$repo" && $cargo build --release --locked --target wasm32-wasip1 -p apitokens-filter)
    wasm=$target_dir/wasm32-wasip1/release/apitokens_filter.wasm
  fi
  [ -f "$wasm" ] || { echo "images.sh: $wasm: no such module" >&2; exit 1; }
  command -v podman >/dev/null || { echo "images.sh: no podman (scripts/images.sh install)" >&2; exit 1; }

  stage=$(mktemp -d "${TMPDIR:-/tmp}/apitokens-images.XXXXXX")
  trap 'rm -rf "$stage"' EXIT
  mkdir -p "$out"

  # The control plane: the build stage's /out, made here by the script the
  # stage runs, then the Containerfile's runtime stage on top of it.
  "$images/rootfs.sh" "$cp_binary" "$stage/control-plane/out"
  podman build --quiet --format docker \
    --build-context build="$stage/control-plane" --build-arg VERSION="$version" \
    -f "$images/Containerfile" \
    -t "localhost/apitokens/control-plane:$tag" -t "ghcr.io/apitokens/control-plane:$tag" "$repo" >/dev/null
  rm -f "$out/control-plane.tar"
  podman save --quiet --format docker-archive -o "$out/control-plane.tar" "ghcr.io/apitokens/control-plane:$tag"

  # The filter: /out/plugin.wasm, as its build stage leaves it.
  install -D -m 0644 "$wasm" "$stage/filter/out/plugin.wasm"
  podman build --quiet --format oci --annotation module.wasm.image/variant=compat \
    --build-context build="$stage/filter" --build-arg VERSION="$version" \
    -f "$images/Containerfile.filter" \
    -t "localhost/apitokens/filter:$tag" -t "ghcr.io/apitokens/filter:$tag" "$repo" >/dev/null
  rm -f "$out/filter.tar"
  podman save --quiet --format oci-archive -o "$out/filter.tar" "ghcr.io/apitokens/filter:$tag"

  # Earlier builds of these tags, now untagged (not other images).
  podman image prune --force --filter "label=org.opencontainers.image.source=$source" >/dev/null

  local name
  for name in control-plane filter; do
    printf '%s\n' "ghcr.io/apitokens/$name:$tag (localhost/apitokens/$name:$tag): $out/$name.tar ($(stat -c %s "$out/$name.tar") bytes)"
  done
}

case ${1:-} in
  install) install_tools ;;
  build) shift; build_images "$@" ;;
  *) echo "usage: $0 install | build [--cp-binary PATH] [--wasm PATH] [--tag TAG] [--out DIR]" >&2; exit 2 ;;
esac
