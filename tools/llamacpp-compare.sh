#!/usr/bin/env bash
# Build llama.cpp from source and time it on a GGUF file, for the comparison in docs/benchmarks.md
# ("llama.cpp on the same file"). llama.cpp is a yardstick here, never a dependency of meshd.
#
#   tools/llamacpp-compare.sh build [DIR]        # ~16 min at -j2 (~35 min at -j1); needs cmake, g++, pip
#   tools/llamacpp-compare.sh bench GGUF [DIR]   # llama-bench tg128 at 2 and 1 threads, then over RPC
#
# The source is the copy vendored in llama-cpp-python's sdist (a pinned llama.cpp that pip can fetch
# from the package registry, the only network this project's machines have).
set -euo pipefail
cmd=${1:?usage: $0 build [DIR] | bench GGUF [DIR]}
if [ "$cmd" = build ]; then
  dir=$(realpath -m "${2:-$HOME/.cache/meshd/llamacpp}")
  mkdir -p "$dir" && cd "$dir"
  [ -n "$(ls llama_cpp_python-*.tar.gz 2>/dev/null)" ] ||
    python3 -m pip download --no-deps --no-binary :all: llama-cpp-python -d .
  tar xzf llama_cpp_python-*.tar.gz
  # configure from the real path (cmake resolves the vendored tree wrongly through a symlink); the UI
  # and curl options are off because they would download at build time
  src=$(cd llama_cpp_python-*/vendor/llama.cpp && pwd -P)
  cmake -S "$src" -B build -DCMAKE_BUILD_TYPE=Release -DGGML_RPC=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_CURL=OFF
  cmake --build build -j "$(nproc)" --target llama-bench ggml-rpc-server
  echo "built: $dir/build/bin/llama-bench and ggml-rpc-server"
elif [ "$cmd" = bench ]; then
  gguf=${2:?the GGUF file}
  bin=$(realpath -m "${3:-$HOME/.cache/meshd/llamacpp}")/build/bin
  "$bin/llama-bench" -m "$gguf" -p 0 -n 128 -r 5 -t 2,1
  # the RPC backend: the model's layers split over two local rpc-server processes, one thread each
  "$bin/ggml-rpc-server" -t 1 -p 50152 >/dev/null 2>&1 & a=$!
  "$bin/ggml-rpc-server" -t 1 -p 50153 >/dev/null 2>&1 & b=$!
  trap 'kill $a $b 2>/dev/null' EXIT
  sleep 1
  "$bin/llama-bench" -m "$gguf" -p 0 -n 128 -r 5 -t 1 --rpc 127.0.0.1:50152,127.0.0.1:50153
else
  echo "usage: $0 build [DIR] | bench GGUF [DIR]" >&2; exit 2
fi
