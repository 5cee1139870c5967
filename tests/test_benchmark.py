"""experiments/benchmark_step.py runs end to end on a tiny model.

Checks the output format (one JSON line per implementation plus the ratio
line, the documented fields, sane values), never the speed.
"""

import json
import os
import subprocess
import sys

import pytest

from experiments import benchmark_step

FIELDS = ("impl", "model", "batch", "size", "dtype", "device", "ms_per_step",
          "images_per_s", "compile_s", "peak_memory_bytes",
          "peak_memory_source", "flops_per_step", "fraction_of_peak",
          "matmul_peak_tflops", "step_times_ms", "loadavg")


def test_both_impls_tiny_model_output_format(tmp_path):
  pytest.importorskip("torch")
  out = tmp_path / "bench.jsonl"
  lines = benchmark_step.main([
      "--impl", "both", "--model", "small_resnet", "--batch", "4",
      "--size", "16", "--steps", "2", "--warmup", "0", "--num_classes", "8",
      "--matmul_size", "64", "--conv_impl", "xla,matmul_grad",
      "--out", str(out)])
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert rows == json.loads(json.dumps(lines))
  impls = [r["impl"] for r in rows if "impl" in r]
  assert impls == ["torch_eager", "jax[xla]", "jax[matmul_grad]"]
  for r in rows[:3]:
    for field in FIELDS:
      assert field in r, (r["impl"], field)
    assert r["ms_per_step"] > 0 and r["images_per_s"] > 0
    assert len(r["step_times_ms"]) == 2
    assert r["flops_per_step"] == rows[0]["flops_per_step"] > 0
    assert 0 < r["fraction_of_peak"]
  ratios = [r for r in rows if "ratio" in r]
  assert [r["ratio"] for r in ratios] == ["jax[xla]/torch_eager",
                                          "jax[matmul_grad]/torch_eager"]
  assert all(r["throughput_ratio"] > 0 for r in ratios)


def test_cli_jax_only_prints_json_lines():
  proc = subprocess.run(
      [sys.executable, "experiments/benchmark_step.py", "--impl", "jax",
       "--model", "small_resnet", "--batch", "4", "--size", "16",
       "--steps", "1", "--warmup", "0", "--num_classes", "4",
       "--matmul_size", "64", "--cpu_devices", "2"],
      capture_output=True, text=True, timeout=300, check=True,
      cwd=benchmark_step.ROOT,
      env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  rows = [json.loads(l) for l in proc.stdout.splitlines()]
  assert len(rows) == 1 and rows[0]["impl"].startswith("jax")
  assert rows[0]["devices"] == 2  # the batch was sharded over 2 CPU devices
