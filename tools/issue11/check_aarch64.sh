#!/usr/bin/env bash
# The int4a8 kernel's aarch64 paths (NEON, and NEON with the dot product) against its plain C path, from an
# x86-64 machine: tools/issue11/paths_agree.c cross-compiled for both, run under qemu-aarch64; then the
# same program built for this machine, as a control. Every line must end "gave the same bits".
#
#   apt-get install gcc-aarch64-linux-gnu libgomp1-arm64-cross qemu-user   # once (Debian, Ubuntu)
#   tools/issue11/check_aarch64.sh
#
# On an aarch64 board itself, `make test` checks the same through Python (tests/model/test_q4a8.py compares
# the "simd" and "c" paths bit for bit), so this is for changes made where no such board is at hand.
set -euo pipefail
cd "$(dirname "$0")/../.."
src=(tools/issue11/paths_agree.c models/q4a8.c models/q4a8_layers.c)
flags=(-O3 -fopenmp -ffp-contract=off -Wall -Imodels)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for arch in armv8-a armv8.2-a+dotprod; do  # Cortex-A72 (Pi 4); A76 / A78 (Pi 5, Jetson Orin)
    aarch64-linux-gnu-gcc "${flags[@]}" -march="$arch" "${src[@]}" -lm -o "$out/paths-$arch"
    printf '%s (qemu-aarch64): ' "$arch"
    qemu-aarch64 -L /usr/aarch64-linux-gnu "$out/paths-$arch" | tr '\n' ' '
    echo
done
cc "${flags[@]}" -march=native "${src[@]}" -lm -o "$out/paths-native"
printf 'this machine: '
"$out/paths-native" | tr '\n' ' '
echo
