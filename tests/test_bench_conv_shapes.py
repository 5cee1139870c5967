"""experiments/bench_conv_shapes.py: the shapes it finds, its output, its
guard against timing two different convolutions. Never the speed."""

import json
import os
import subprocess
import sys

import pytest

from experiments import bench_conv_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_lines(*flags, model="tiny_resnet"):
  """The script's JSON lines for a 16-px, batch-2 run with ``flags``."""
  result = subprocess.run(
      [sys.executable, "experiments/bench_conv_shapes.py", "--model", model,
       "--size", "16", "--batch", "2", "--reps", "2", *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-2000:]
  return [json.loads(l) for l in result.stdout.splitlines()]


def test_shapes_of_the_tiny_model():
  shapes = bench_conv_shapes.conv_shapes("tiny_resnet", 2, 16)
  # Stem (3 -> 4, stride 2), then one block's two 3x3 convs (4 -> 4).
  assert [(s["input"], s["kernel"], s["strides"], n) for s, n in shapes] == [
      ([2, 16, 16, 3], [3, 3, 3, 4], [2, 2], 1),
      ([2, 8, 8, 4], [3, 3, 4, 4], [1, 1], 2)]


def test_cli_prints_a_line_per_shape_and_weighted_totals():
  pytest.importorskip("torch")
  *rows, total = _run_lines()
  assert len(rows) == 2 and total["convs"] == 3 and total["distinct"] == 2
  for lib in ("xla", "torch"):
    for step in ("fwd", "dx", "dw"):
      assert all(r[f"{lib}_ms"][step] > 0 for r in rows)
      want = sum(r["uses"] * r[f"{lib}_ms"][step] for r in rows)
      assert total[f"{lib}_{step}_ms"] == pytest.approx(want, abs=0.02)
  assert all(r["fwd_rel_diff"] < 1e-5 for r in rows)


def test_different_convolutions_are_an_error_not_a_timing(monkeypatch,
                                                           capsys):
  pytest.importorskip("torch")
  real = bench_conv_shapes.time_torch

  def off_by_one(shape, reps):
    times, out = real(shape, reps)
    return times, out + 1.0
  monkeypatch.setattr(bench_conv_shapes, "time_torch", off_by_one)
  with pytest.raises(SystemExit, match="forward outputs differ"):
    bench_conv_shapes.main(["--model", "tiny_resnet", "--size", "16",
                            "--batch", "2", "--reps", "1", "--threads", "0"])


@pytest.mark.parametrize("argv", [["--threads", "2"], ["--batch", "0"],
                                  ["--cpu_library_fusion", "eigen"],
                                  ["--reps", "x"], ["--model", "vgg"]])
def test_bad_arguments_are_usage_errors(argv, capsys):
  with pytest.raises(SystemExit) as error:
    bench_conv_shapes.parse_args(argv)
  assert error.value.code == 2
  assert "error:" in capsys.readouterr().err


def test_dw_forms_are_timed_for_stride_one_convs_only():
  stem, block, _ = _run_lines("--no_torch", "--dw_forms")
  assert stem["xla_dw_forms_ms"] == {}  # stride 2: not a form's shape
  assert set(block["xla_dw_forms_ms"]) == {"im2col", "taps"}
  assert all(ms > 0 for ms in block["xla_dw_forms_ms"].values())


def test_a_dw_form_with_another_gradient_is_an_error(monkeypatch):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  real = bench_conv_shapes._dw_gemm_forms

  def transposed_taps(shape, options=None):
    forms = real(shape, options)
    forms["taps"] = lambda x, g, f=forms["taps"]: jnp.flip(f(x, g), 0)
    return forms
  monkeypatch.setattr(bench_conv_shapes, "_dw_gemm_forms", transposed_taps)
  shape = {"input": [2, 6, 6, 3], "kernel": [3, 3, 3, 4], "strides": [1, 1],
           "padding": [[1, 1], [1, 1]], "groups": 1}
  with pytest.raises(SystemExit, match="filter gradient as taps differs"):
    bench_conv_shapes.time_dw_forms(shape, 1)


def test_kernel_column_is_timed_and_totalled():
  from rebll_jax.models import cpu_kernels
  if not cpu_kernels.available():
    pytest.skip(f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
  # The column's format (tiny_resnet's 4 channels stay on XLA: the kernels'
  # own numbers are tests/test_cpu_kernels.py's).
  *rows, total = _run_lines("--no_torch", "--kernel")
  for step in ("fwd", "dx", "dw"):
    assert all(r["kernel_ms"][step] > 0 for r in rows)
    want = sum(r["uses"] * r["kernel_ms"][step] for r in rows)
    assert total[f"kernel_{step}_ms"] == pytest.approx(want, abs=0.02)
