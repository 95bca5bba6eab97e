#!/bin/bash
# A/B/A/B: baseline (commit e6c1a1d, exported to /tmp/h11/basesrc) against this branch, same command
cd /work/h11
for round in 1 2; do
  for side in base new; do
    src=/work/h11; [ $side = base ] && src=${BASE:?set BASE to a checkout of the baseline, e.g. git archive e6c1a1d | tar -x -C DIR}
    echo "== $side round $round $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
    PYTHONPATH=$src /work/main/.venv/bin/meshd bench --backend local --weights ${W:-native} --threads ${TH:-1} \
      --modes ar,spec --questions everyday --n-categories 4 --per-category 1 --max-tokens 64 --out ${OUT:-runs}/ab-$side 2>&1 | grep -E "^\| ALL|^one device"
  done
done
