#!/usr/bin/env bash
# meshd next to llama.cpp on this machine, interleaved: llama-bench tg128 and `meshd bench` (ar, spec:auto)
# one after the other, ROUNDS times, at 2 threads and at 1 thread, so that both see the same machine
# (a shared host's speed drifts by 20 % within minutes; figures taken minutes apart do not compare).
#
#   tools/issue11/interleaved.sh [ROUNDS]     # default 3; needs tools/llamacpp-compare.sh build first
#
# Prints one line per run; meshd's records go to runs/ (OUT=DIR to change).
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
gguf=$(.venv/bin/python -c "from models.source import ModelSource; print(ModelSource.resolve('default').path)")
bin=${LLAMACPP:-$HOME/.cache/meshd/llamacpp}/build/bin
for th in 2 1; do
  for r in $(seq "$rounds"); do
    t=$("$bin/llama-bench" -m "$gguf" -t "$th" -p 0 -n 128 -r 3 2>/dev/null | awk -F'|' '/tg128/ {print $(NF-1)}')
    echo "threads $th round $r $(date -u +%H:%M:%S) llama.cpp tg128 $t"
    .venv/bin/meshd bench --backend local --threads "$th" --modes "ar,spec:auto" --questions everyday \
      --n-categories 12 --per-category 1 --max-tokens 128 --out "${OUT:-runs}" 2>/dev/null |
      awk -v th="$th" -v r="$r" -F'|' '/^\| ALL/ {printf "threads %s round %s meshd ar %s (decode %s) spec:auto %s (decode %s) spec/ar %s\n", th, r, $3, $4, $6, $7, $9}'
  done
done
