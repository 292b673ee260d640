#!/bin/sh
# Build llama.cpp's llama-server (CPU only) from the llama-cpp-python 0.3.36 PyPI sdist's vendor/llama.cpp, for
# bench/serve.py's peer column. The sdist is fetched by tests/peers/fetch_llama_sdist.sh (pip download + tar);
# nothing from it is copied into this repository. The build lives under ~/.cache/k2local/.
# Usage: bench/peers/build_llama_server.sh [python]   prints the llama-server path when done.
# Environment: K2LOCAL_LLAMA_SDIST (sdist dir), K2LOCAL_LLAMA_SERVER_BUILD (build dir), JOBS (default nproc).
set -eu
VER=0.3.36
SDIST=${K2LOCAL_LLAMA_SDIST:-$HOME/.cache/k2local/llama-cpp-python-$VER}
BUILD=${K2LOCAL_LLAMA_SERVER_BUILD:-$HOME/.cache/k2local/llama-server-$VER}
HERE=$(cd "$(dirname "$0")" && pwd)
if [ ! -f "$SDIST/vendor/llama.cpp/CMakeLists.txt" ]; then
    "$HERE/../../tests/peers/fetch_llama_sdist.sh" "${1:-python3}" >/dev/null
fi
cmake -S "$SDIST/vendor/llama.cpp" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >&2
cmake --build "$BUILD" --target llama-server -j "${JOBS:-$(nproc)}" >&2
test -x "$BUILD/bin/llama-server"
echo "$BUILD/bin/llama-server"
