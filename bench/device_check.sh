#!/usr/bin/env bash
# The device check in one command, from a source checkout, with nothing installed:
#   bash bench/device_check.sh OUTDIR [--deadline SECONDS] [--smoke]
# Prints the device and versions, checks both ops against the eager reference at the model shapes,
# runs the GPU-marked tests and the benchmark suite, all under one hard deadline (default 520 s),
# and writes everything into OUTDIR (see bench/README.md, "The device check"). --smoke: the same on
# the CPU (tiny shapes, Triton under the interpreter), any GPU hidden.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
for arg in "$@"; do
    if [ "$arg" = "--smoke" ]; then
        export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
    fi
done
exec "${PYTHON:-python3}" -m bench.device_check "$@"
