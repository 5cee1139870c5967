"""experiments/bench_conv_shapes.py: the shapes it finds, its output, its
guard against timing two different convolutions. Never the speed."""

import json
import os
import subprocess
import sys

import pytest

from experiments import bench_conv_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shapes_of_the_tiny_model():
  shapes = bench_conv_shapes.conv_shapes("tiny_resnet", 2, 16)
  # Stem (3 -> 4, stride 2), then one block's two 3x3 convs (4 -> 4).
  assert [(s["input"], s["kernel"], s["strides"], n) for s, n in shapes] == [
      ([2, 16, 16, 3], [3, 3, 3, 4], [2, 2], 1),
      ([2, 8, 8, 4], [3, 3, 4, 4], [1, 1], 2)]


def test_cli_prints_a_line_per_shape_and_weighted_totals():
  pytest.importorskip("torch")
  result = subprocess.run(
      [sys.executable, "experiments/bench_conv_shapes.py", "--model",
       "tiny_resnet", "--size", "16", "--batch", "2", "--reps", "2"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-2000:]
  *rows, total = [json.loads(l) for l in result.stdout.splitlines()]
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
                                  ["--reps", "x"], ["--model", "vgg"]])
def test_bad_arguments_are_usage_errors(argv, capsys):
  with pytest.raises(SystemExit) as error:
    bench_conv_shapes.parse_args(argv)
  assert error.value.code == 2
  assert "error:" in capsys.readouterr().err
