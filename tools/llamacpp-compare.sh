#!/usr/bin/env bash
# Build llama.cpp from source and time it on a GGUF file, for the comparison in docs/benchmarks.md
# ("llama.cpp on the same file"). llama.cpp is a yardstick here, never a dependency of meshd.
#
#   tools/llamacpp-compare.sh build [DIR]        # needs cmake, g++, pip; 8 min at JOBS=1, nice 10 (2026-12-02)
#   JOBS=1 tools/llamacpp-compare.sh build [DIR] # compile jobs (default: nproc); 1 on a shared machine
#   tools/llamacpp-compare.sh bench GGUF [DIR]   # llama-bench tg128 at 2 and 1 threads, then over RPC
#   RPC_LOG=PREFIX tools/llamacpp-compare.sh bench GGUF [DIR]   # keep the servers' output in PREFIX-{a,b}.log
#
# The RPC run: two ggml-rpc-server processes on 127.0.0.1 (one thread each) are two devices, and
# llama-bench (one thread: it only looks up token embeddings) offloads every layer to them with -ngl 99
# (-ngl 0 keeps them all on the client and the backend column still says "RPC"; this build's default,
# -1, offloads all, older builds' default was 0). llama.cpp splits the layers by the servers' free memory;
# on SmolLM2-135M: 16 layers on the first, 14 and the output matrix on the second, the token embeddings
# on the client. The servers' own output says only "Accepted client connection", so the split is
# printed from a short verbose run ("layer N assigned to device RPCk", "model buffer size") before
# the timed one. llama-bench's backend column then says "RPC".
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
  cmake --build build -j "${JOBS:-$(nproc)}" --target llama-bench ggml-rpc-server
  echo "built: $dir/build/bin/llama-bench and ggml-rpc-server"
elif [ "$cmd" = bench ]; then
  gguf=${2:?the GGUF file}
  bin=$(realpath -m "${3:-$HOME/.cache/meshd/llamacpp}")/build/bin
  uptime  # the load beside the figures: this machine is shared
  "$bin/llama-bench" -m "$gguf" -p 0 -n 128 -r 5 -t 2,1
  a_log=/dev/null b_log=/dev/null
  [ -z "${RPC_LOG:-}" ] || { a_log=$RPC_LOG-a.log b_log=$RPC_LOG-b.log; }
  "$bin/ggml-rpc-server" -t 1 -p 50152 >"$a_log" 2>&1 & a=$!
  "$bin/ggml-rpc-server" -t 1 -p 50153 >"$b_log" 2>&1 & b=$!
  trap 'kill $a $b 2>/dev/null' EXIT
  sleep 1
  rpc=(--rpc 127.0.0.1:50152,127.0.0.1:50153 -ngl 99)
  echo "layers per device (one verbose token):"
  "$bin/llama-bench" -m "$gguf" -p 0 -n 1 -r 1 -t 1 "${rpc[@]}" -v 2>&1 |
    grep -E "assigned to device|offloaded|model buffer size" |
    sed -E 's/.*layer +[0-9]+ assigned to device ([^,]+).*/\1/' | uniq -c
  uptime
  "$bin/llama-bench" -m "$gguf" -p 0 -n 128 -r 5 -t 1 "${rpc[@]}"
else
  echo "usage: $0 build [DIR] | bench GGUF [DIR]" >&2; exit 2
fi
