#!/usr/bin/env bash
# One-command GPU check (issue 15, item 8): smoke runs of every method with AMP
# bf16 and fp16, the Table 14 overhead factors at 224 px, loader throughput,
# peak GPU memory and a short SimSiam baseline-vs-HVS k-NN signal, in one JSON.
#
# On a lent GPU (about 8 minutes on one GPU), from the repository root:
#     bash bench/gpu_check.sh --data-dir /path/to/data          # CIFAR-10 under the data root
#     bash bench/gpu_check.sh --data-dir D --output bench/gpu_check.json
# Without --data-dir the sections train on a synthetic image folder (the signal
# section's k-NN numbers are then meaningless).  The JSON (default
# bench/gpu_check.json) and its numbers go into the README.
# CPU self-test of the script (a minute or two; tests/test_gpu_check.py):
#     bash bench/gpu_check.sh --device cpu --tiny --output /tmp/gpu_check.json
# Options: python -m bench.gpu_check --help
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec python -m bench.gpu_check "$@"
