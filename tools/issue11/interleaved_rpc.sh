#!/usr/bin/env bash
# meshd on 2 loopback daemons next to llama.cpp's RPC backend over 2 local rpc-server processes (one thread
# each), interleaved: llama-bench tg128 over RPC, then `meshd bench --backend daemons --stages 2` (ar, flow)
# with every daemon originating (even split), then with daemon 1 serving its stage only (--roles both,stage:
# the planner takes daemon 0's measured originator work off its layers), ROUNDS times, so that all three see
# the same machine (a shared host's speed drifts by 20 % within minutes).
#
#   tools/issue11/interleaved_rpc.sh [ROUNDS]   # default 3; needs tools/llamacpp-compare.sh build first
#
# Prints one line per run; meshd's records go to runs/ (OUT=DIR to change).
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
gguf=$(.venv/bin/python -c "from models.source import ModelSource; print(ModelSource.resolve('default').path)")
bin=${LLAMACPP:-$HOME/.cache/meshd/llamacpp}/build/bin
"$bin/ggml-rpc-server" -t 1 -p 50152 >/dev/null 2>&1 & a=$!
"$bin/ggml-rpc-server" -t 1 -p 50153 >/dev/null 2>&1 & b=$!
trap 'kill $a $b 2>/dev/null' EXIT
sleep 1
for r in $(seq "$rounds"); do
  t=$("$bin/llama-bench" -m "$gguf" -t 1 -p 0 -n 128 -r 3 --rpc 127.0.0.1:50152,127.0.0.1:50153 -ngl 99 2>/dev/null |
    awk -F'|' '/tg128/ {print $(NF-1)}')
  echo "round $r $(date -u +%H:%M:%S) llama.cpp RPC tg128 $t"
  for roles in "" "--roles both,stage"; do
    # shellcheck disable=SC2086  # $roles is empty or two words
    .venv/bin/meshd bench --backend daemons --stages 2 --threads 1 --modes ar,flow $roles --questions everyday \
      --n-categories 12 --per-category 1 --max-tokens 128 --out "${OUT:-runs}" 2>/dev/null |
      awk -v r="$r" -v roles="${roles:-(all both)}" -F'|' '
        /layers per stage/ {split($0, p, "layers per stage "); split(p[2], q, ","); layers = q[1]}
        /^\| ALL/ {printf "round %s meshd 2 daemons %s layers %s: ar %s (decode %s) flow %s (decode %s, %s tokens/round) flow/ar %s\n", r, roles, layers, $3, $4, $6, $7, $8, $9}'
  done
done
