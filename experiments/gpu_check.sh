#!/usr/bin/env bash
# One-GPU check of the JAX vs PyTorch RebLL step: TResNet-M and ResNet-50,
# batch 64, 224 px, bfloat16 and float32, both implementations timed in the
# same process. Writes JSON lines (one per implementation + ratio lines) to
# $OUT_FILE (default gpu_check.jsonl) and prints them; about 3-4 minutes on
# an H100 (most of it compiles).
#
#   bash experiments/gpu_check.sh [OUT_FILE]
#
# Needs a CUDA jax (pip install -U "jax[cuda12]") and a CUDA torch in the
# active environment. Targets (issue 7): JAX >= 1.5x PyTorch eager images/s
# in bfloat16, >= 35% of the measured bf16 matmul peak.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_FILE="${1:-gpu_check.jsonl}"
: > "$OUT_FILE"
# Let XLA and PyTorch share the card: no upfront 75% grab by XLA.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
python - <<'PY'
import jax, torch
assert jax.default_backend() == "gpu", f"JAX backend is {jax.default_backend()}, not gpu"
assert torch.cuda.is_available(), "torch sees no CUDA device"
print("jax", jax.__version__, jax.devices()[0].device_kind, "| torch",
      torch.__version__, torch.cuda.get_device_name(0), flush=True)
PY
for model in resnet50 tresnet_m; do
  for dtype in bfloat16 float32; do
    timeout 150 python experiments/benchmark_step.py --impl both \
      --model "$model" --batch 64 --size 224 --dtype "$dtype" \
      --steps 20 --warmup 3 --out "$OUT_FILE" \
      || echo "{\"failed\": \"$model $dtype\", \"rc\": $?}" | tee -a "$OUT_FILE"
  done
done
echo "wrote $OUT_FILE"
