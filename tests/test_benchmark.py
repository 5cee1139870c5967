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
from tests.helpers import usage_error_line

FIELDS = ("impl", "model", "batch", "size", "dtype", "device", "ms_per_step",
          "images_per_s", "compile_s", "peak_memory_bytes",
          "peak_memory_source", "flops_per_step", "fraction_of_peak",
          "matmul_peak_tflops", "step_times_ms", "loadavg", "host_malloc")


def test_both_impls_tiny_model_output_format(tmp_path):
  pytest.importorskip("torch")
  out = tmp_path / "bench.jsonl"
  lines = benchmark_step.main([
      "--impl", "both", "--model", "tiny_resnet", "--batch", "4",
      "--size", "16", "--steps", "2", "--warmup", "0", "--num_classes", "8",
      "--matmul_size", "64", "--conv_impl", "xla",
      "--cpu_library_fusion", "reductions,xla_default", "--out", str(out)])
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert rows == json.loads(json.dumps(lines))
  impls = [r["impl"] for r in rows if "impl" in r]
  jax_variants = ["jax[xla,norm=fused,reductions,sched=memory]",
                  "jax[xla,norm=fused,xla_default,sched=memory]"]
  assert impls == ["torch_eager", "torch_eager_nchw"] + jax_variants
  for r in rows[:4]:
    for field in FIELDS + ("cpu_ms_per_step",):
      assert field in r, (r["impl"], field)
    assert r["ms_per_step"] > 0 and r["images_per_s"] > 0
    assert len(r["step_times_ms"]) == 2
    assert r["flops_per_step"] == rows[0]["flops_per_step"] > 0
    assert 0 < r["fraction_of_peak"]
  ratios = [r for r in rows if "ratio" in r]
  fastest = max(rows[:2], key=lambda r: r["images_per_s"])["impl"]
  assert [r["ratio"] for r in ratios] == [f"{v}/{fastest}"
                                          for v in jax_variants]
  assert all(r["fastest_torch"] == fastest for r in ratios)
  assert all(r["throughput_ratio"] > 0 for r in ratios)
  assert set(ratios[0]["per_torch_variant"]) == {"torch_eager",
                                                 "torch_eager_nchw"}


def test_a_variant_listed_twice_is_timed_once(capsys):
  # On CPU "auto" is "fused": two runners of one name would pool their
  # steps into one believable-looking row.
  lines = benchmark_step.main([
      "--impl", "jax", "--model", "tiny_resnet", "--batch", "4", "--size",
      "16", "--steps", "2", "--warmup", "0", "--num_classes", "8",
      "--matmul_size", "64", "--conv_impl", "xla",
      "--norm_impl", "auto,fused,flax", "--cpu_scheduler",
      "memory,xla_default"])
  impls = [l["impl"] for l in lines if "impl" in l]
  assert impls == ["jax[xla,norm=fused,reductions,sched=memory]",
                   "jax[xla,norm=fused,reductions,sched=xla_default]",
                   "jax[xla,norm=flax,reductions,sched=memory]",
                   "jax[xla,norm=flax,reductions,sched=xla_default]"]
  assert all(len(l["step_times_ms"]) == 2 for l in lines if "impl" in l)
  assert "already listed; timed once" in capsys.readouterr().err


def test_ratio_is_against_the_fastest_torch_variant():
  rows = [{"impl": "torch_eager", "images_per_s": 10.0,
           "cpu_ms_per_step": 100.0},
          {"impl": "torch_compile", "images_per_s": 40.0,
           "cpu_ms_per_step": 50.0},
          {"impl": "jax[x]", "images_per_s": 20.0, "cpu_ms_per_step": 25.0}]
  for r in rows:
    r.update(model="m", batch=1, size=8, dtype="float32")
  (line,) = benchmark_step.ratio_lines(rows)
  assert line["ratio"] == "jax[x]/torch_compile"
  assert line["throughput_ratio"] == 0.5  # 20 / 40, not 20 / 10
  assert line["cpu_time_ratio"] == 2.0  # 50 ms / 25 ms
  assert line["per_torch_variant"] == {"torch_eager": 2.0,
                                       "torch_compile": 0.5}
  assert benchmark_step.ratio_lines(rows[2:]) == []  # no PyTorch, no ratio
  assert "paired_ratio" not in line  # no step times: no paired ratio


def test_paired_ratio_is_round_by_round():
  # A machine that slows down mid-run: medians of each side would mix the
  # fast and slow rounds; the paired ratio compares like with like.
  torch_ms = [100.0, 100.0, 300.0, 300.0, 300.0]
  jax_ms = [50.0, 50.0, 150.0, 150.0, 100.0]
  paired = benchmark_step.paired_ratio(torch_ms, jax_ms)
  assert paired == {"median": 2.0, "q1": 2.0, "q3": 2.0, "min": 2.0,
                    "max": 3.0, "rounds": 5}
  assert benchmark_step.paired_ratio(torch_ms, jax_ms[:4]) is None
  assert benchmark_step.paired_ratio([], []) is None
  rows = [{"impl": "torch_eager", "images_per_s": 1.0, "cpu_ms_per_step": 1.0,
           "step_times_ms": [10.0, 20.0, 30.0, 40.0]},
          {"impl": "jax[x]", "images_per_s": 1.0, "cpu_ms_per_step": 1.0,
           "step_times_ms": [20.0, 20.0, 20.0, 20.0]}]
  for r in rows:
    r.update(model="m", batch=1, size=8, dtype="float32")
  (line,) = benchmark_step.ratio_lines(rows)
  assert line["paired_ratio"] == {"median": 1.25, "q1": 0.875, "q3": 1.625,
                                  "min": 0.5, "max": 2.0, "rounds": 4}


def test_unknown_torch_variant_is_an_error(capsys):
  with pytest.raises(SystemExit) as exit_info:
    benchmark_step.parse_args(["--torch_variants", "eager,fast"])
  assert exit_info.value.code == 2
  assert "unknown --torch_variants ['fast']" in capsys.readouterr().err
  args = benchmark_step.parse_args(["--torch_compile"])
  assert benchmark_step.torch_variants(args) == ["eager", "eager_nchw",
                                                 "compile"]
  # No variant but --torch_compile's: fine.
  args = benchmark_step.parse_args(["--torch_variants", ",",
                                    "--torch_compile"])
  assert benchmark_step.torch_variants(args) == ["compile"]


def test_an_unwritable_out_is_an_error_before_any_timing(tmp_path, capsys):
  (tmp_path / "a_file").write_text("")
  # --cpu_library_fusion fast would stop later: --out is checked first.
  line = usage_error_line(benchmark_step.main, [
      "--impl", "jax", "--out", str(tmp_path / "a_file" / "x.jsonl"),
      "--cpu_library_fusion", "fast"], capsys)  # was exit 1
  assert line.startswith("error: --out ") and line.endswith(
      "a_file/x.jsonl: Not a directory")




def test_unknown_cpu_library_fusion_is_an_error(capsys):
  assert usage_error_line(benchmark_step.main, [
      "--impl", "jax", "--cpu_library_fusion", "reductions,fast"],
      capsys).startswith("error: unknown --cpu_library_fusion 'fast'")


@pytest.mark.parametrize("argv", [
    ["--batch", "0"], ["--steps", "0"], ["--warmup", "-1"],
    ["--xla_options", "notjson"], ["--xla_options", "{}"],
    ["--xla_options", "[1]"]])
def test_bad_numbers_and_options_are_usage_errors(argv):
  with pytest.raises(SystemExit) as exit_info:
    benchmark_step.parse_args(argv)
  assert exit_info.value.code == 2


@pytest.mark.parametrize("argv,why", [
    # A TypeError traceback after all the timing.
    (["--matmul_size", "-5"], "--matmul_size must be >= 0"),
    # "ValueError: max() arg is an empty sequence".
    (["--impl", "torch", "--torch_variants", ","], "--torch_variants ',' "
     "names no variant"),
    # One line, but exit 1.
    (["--batch", "3", "--cpu_devices", "2"], "--batch 3 must divide over "
     "--cpu_devices 2"),
    # Timed a step without old or current classes and exited 0.
    (["--num_classes", "1"], "--num_classes must be >= 3, got 1"),
    (["--num_classes", "2"], "--num_classes must be >= 3, got 2"),
])
def test_arguments_that_cannot_make_a_step_are_usage_errors(argv, why,
                                                            capsys):
  assert why in usage_error_line(benchmark_step.parse_args, argv, capsys)


def test_three_classes_make_old_and_current_ones():
  old, current = benchmark_step.make_masks(3)
  assert old.tolist() == [True, False, False]
  assert current.tolist() == [False, True, False]


def test_unknown_kernel_choice_and_compile_option_are_errors(capsys):
  assert "error: unknown --conv_impl 'foo'" in usage_error_line(
      benchmark_step.main, ["--impl", "jax", "--conv_impl", "gemm,foo"],
      capsys)
  assert "error: unknown --norm_impl 'bar'" in usage_error_line(
      benchmark_step.main, ["--impl", "jax", "--norm_impl", "fused,bar"],
      capsys)
  # Exit 2 (was 1), before any model is built.
  assert "No such compile option" in usage_error_line(
      benchmark_step.main, ["--impl", "jax", "--model", "tiny_resnet",
                            "--batch", "2", "--size", "16", "--steps", "1",
                            "--xla_options", '[{"xla_no_such_option": 1}]'],
      capsys)


def test_cli_jax_only_prints_json_lines():
  proc = subprocess.run(
      [sys.executable, "experiments/benchmark_step.py", "--impl", "jax",
       "--model", "tiny_resnet", "--batch", "4", "--size", "16",
       "--steps", "1", "--warmup", "0", "--num_classes", "4",
       "--matmul_size", "64", "--cpu_devices", "2"],
      capture_output=True, text=True, timeout=300, check=True,
      cwd=benchmark_step.ROOT,
      env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  rows = [json.loads(l) for l in proc.stdout.splitlines()]
  assert len(rows) == 1 and rows[0]["impl"].startswith("jax")
  assert rows[0]["devices"] == 2  # the batch was sharded over 2 CPU devices


def test_torch_losses_equal_the_jax_losses():
  torch = pytest.importorskip("torch")
  import numpy as np  # pylint: disable=g-import-not-at-top
  from rebll_jax import losses  # pylint: disable=g-import-not-at-top
  from experiments.torch_baseline import rebll_step  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  z = rng.normal(0, 3, (6, 5)).astype(np.float32)
  z_old = rng.normal(0, 3, (6, 5)).astype(np.float32)
  y = (rng.random((6, 5)) < 0.4).astype(np.float32)
  for mask in ((rng.random((6, 5)) < 0.5).astype(np.float32),
               np.zeros((6, 5), np.float32)):  # no selected entry at all
    ours = rebll_step.asymmetric_distillation(
        torch.from_numpy(z), torch.from_numpy(z_old), torch.from_numpy(mask),
        beta=1.0, adaptive=True)
    ref = losses.asymmetric_distillation(logits=z, old_logits=z_old,
                                         mask=mask, beta=1.0, adaptive=True)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-6)
    ours = rebll_step.asymmetric_bce(torch.from_numpy(z), torch.from_numpy(y),
                                     torch.from_numpy(mask), g_pos=1.0)
    ref = losses.asymmetric_bce(logits=z, labels=y, mask=mask, g_pos=1.0)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_torch_step_variants_compute_the_same_step():
  torch = pytest.importorskip("torch")
  from experiments.torch_baseline import rebll_step  # pylint: disable=g-import-not-at-top
  host, masks = benchmark_step.make_inputs(4, 16, 8)
  masks = {k: torch.as_tensor(v) for k, v in masks.items()}
  results = []
  for fmt, fused in (("contiguous", False), ("channels_last", False),
                     ("channels_last", rebll_step.has_fused_adam())):
    step = rebll_step.RebllStep("small_resnet", 8, masks, memory_format=fmt,
                                fused_adam=fused, total_steps=10,
                                warmup_frac=0.0)
    batch = step.to_device(host)
    losses_ = [float(step(batch)) for _ in range(2)]
    results.append((losses_, step.model.head.weight.detach().clone()))
  for losses_, head in results[1:]:
    assert losses_ == pytest.approx(results[0][0], rel=1e-4)
    torch.testing.assert_close(head, results[0][1], rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="memory_format"):
    rebll_step.RebllStep("small_resnet", 8, masks, memory_format="nhwc")
