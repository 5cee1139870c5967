#!/usr/bin/env bash
# The one-GPU check (experiments/gpu_check.py): environment and matmul peak,
# a tiny 2-task training run, the JAX vs PyTorch step benchmark (TResNet-M
# and ResNet-50, batch 64, 224 px, bfloat16 and float32), the host loader,
# then flax against the fused BatchNorm if time is left.
# JSON lines on stdout and in OUT_DIR/gpu_check.jsonl; within 8 minutes.
#
#   bash experiments/gpu_check.sh [OUT_DIR]
#
# On the GPU image (no network): first, where the package registry is
# reachable, `python experiments/fetch_gpu_wheels.py` fills
# experiments/gpu_wheels/ with what the image lacks; carry it along.
set -euo pipefail
cd "$(dirname "$0")/.."
# Let XLA and PyTorch share the card: no upfront 75% grab by XLA.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
exec python experiments/gpu_check.py --out "${1:-gpu_check_out}"
