#!/bin/sh
# Download the llama-cpp-python 0.3.36 sdist with pip and unpack it where tests/peers/llama_convert.py looks
# ($K2LOCAL_LLAMA_SDIST, default ~/.cache/k2local/llama-cpp-python-0.3.36). Only pip download + tar; the sdist's
# code (llama.cpp's convert_hf_to_gguf.py and gguf-py) is used from there, never copied into this repository.
# Usage: tests/peers/fetch_llama_sdist.sh [python]   (python: the interpreter whose pip to use; default python3)
set -eu
PY=${1:-python3}
VER=0.3.36
DEST=${K2LOCAL_LLAMA_SDIST:-$HOME/.cache/k2local/llama-cpp-python-$VER}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$TMP"
mkdir -p "$DEST"
tar xzf "$TMP/llama_cpp_python-$VER.tar.gz" -C "$DEST" --strip-components=1
test -f "$DEST/vendor/llama.cpp/convert_hf_to_gguf.py"
echo "$DEST"
