"""The small benchmark scripts: bench_nonfinite_guard, bench_pipeline,
bench_field_augment, bench_relabel, and benchmark_step's labels and memory
figures (review 3: A1, A3, A9, A10, B5-B11, B15, C1).

A user's mistake is one usage line (exit 2) before any work; what a script
records names what it measured. Nothing here compiles a model's step.
"""

import json
import os
import subprocess
import sys
import types

import jax
import pytest

from experiments import bench_field_augment, bench_nonfinite_guard
from experiments import bench_pipeline, bench_relabel, benchmark_step
from tests.helpers import usage_error_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------- bench_nonfinite_guard ---

@pytest.mark.parametrize("argv,why", [
    # Was a StatisticsError after ~20 s of compiling.
    (["--iters", "0"], "--iters: must be >= 1, got 0"),
    (["--iters", "x"], "--iters: expected an integer"),
    (["--cpu_devices", "-1"], "--cpu_devices: must be >= 0, got -1"),
])
def test_guard_bench_bad_flags_are_usage_errors(argv, why, capsys,
                                                monkeypatch):
  from rebll_jax import train  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(train, "set_up",
                      lambda *a: pytest.fail("started the benchmark"))
  assert why in usage_error_line(bench_nonfinite_guard.main, argv, capsys)


def test_guard_bench_jits_before_as_the_run_jits_its_step(monkeypatch):
  # The "before" program had XLA's default options (and no donation): the
  # ratio measured the compiler options, not the guard.
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  from rebll_jax import methods, optim, parallel, train  # pylint: disable=g-import-not-at-top
  from rebll_jax.models import build_model  # pylint: disable=g-import-not-at-top
  calls = []
  real_jit = jax.jit

  def recording_jit(fun, **kwargs):
    calls.append(kwargs)
    return real_jit(fun, **kwargs)

  monkeypatch.setattr(jax, "jit", recording_jit)
  config = synthetic.get_config()
  mesh = parallel.make_mesh(1)
  bench_nonfinite_guard.jit_like_the_run(lambda s: s, mesh, config.model)
  setup = types.SimpleNamespace(
      mesh=mesh, config=config, model=build_model(config.model, 8),
      method=methods.get_method(config.method), tx=optim.make_transform(
          config.optim))
  train.compile_steps(setup)  # jits "first" and "later" alike
  # Not xla_cpu's one-off probes of an option: the three steps' jits.
  steps_ = [c for c in calls if "out_shardings" in c]
  assert len(steps_) == 3
  before, later = steps_[0], steps_[-1]
  assert before.keys() == later.keys()
  assert before["donate_argnums"] == later["donate_argnums"]
  assert before["out_shardings"] == later["out_shardings"]
  assert before["compiler_options"] == later["compiler_options"]
  if jax.default_backend() == "cpu":
    assert before["compiler_options"]  # the run's options, not XLA's


def test_guard_bench_splits_the_cpu_as_the_default_experiment():
  # JAX was imported at module top, so configs/synthetic.py's
  # cpu_devices=2 could not split the CPU: the step ran on one device.
  code = (
      "import sys; sys.path.insert(0, '.')\n"
      "from experiments import bench_nonfinite_guard as b\n"
      "assert 'jax' not in sys.modules\n"
      "def stop(config, workdir):\n"
      "  import jax\n"
      "  print(len(jax.devices()), config.cpu_devices)\n"
      "  raise SystemExit(0)\n"
      "split = b.xla_cpu.split_host_cpu\n"
      "def split_then_stop(n):\n"  # train imports JAX: after the split
      "  said = split(n)\n"
      "  from rebll_jax import train\n"
      "  train.set_up = stop\n"
      "  return said\n"
      "b.xla_cpu.split_host_cpu = split_then_stop\n"
      "b.main(sys.argv[1:])\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  for argv, expected in (([], "2 2"),):
    proc = subprocess.run([sys.executable, "-c", code] + argv, cwd=ROOT,
                          env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    assert proc.stdout.split("\n")[-2] == expected, proc.stderr


# --------------------------------------------------------- bench_pipeline ---

def test_pipeline_assumed_gpu_rate_does_not_follow_the_reader_batch():
  # `--batch 4` made the GPU eat 4 / 45 ms = 89 images/s under a record
  # that says "at batch 64".
  storages = {"256": {"decode_resize_images_per_s": {
      "workers_1_per_cpu_s": 100.0}}}
  row = bench_pipeline.comparison(45.0, storages)
  assert row["assumed_tresnet_m_step_ms_at_batch_64"] == 45.0
  assert row["gpu_consumes_images_per_s"] == round(64 / 0.045, 1)
  assert row["cores_needed_for_decode"] == {"256": round(64 / 0.045 / 100,
                                                         1)}


# ---------------------------------------------------- bench_field_augment ---

@pytest.mark.parametrize("argv,why", [
    # B5: ZeroDivisionError; B8: negative images/s and cores, exit 0.
    (["--assumed_step_ms", "0"], "--assumed_step_ms: must be a finite "
     "number > 0, got 0"),
    (["--assumed_step_ms", "-45"], "--assumed_step_ms: must be a finite "
     "number > 0, got -45"),
    (["--assumed_step_ms", "nan"], "--assumed_step_ms: must be a finite"),
    (["--assumed_step_ms", "fast"], "--assumed_step_ms: expected a number"),
    # B6: ValueError traceback.
    (["--sizes", "16,abc"], "--sizes '16,abc': expected an integer, got "
     "'abc'"),
    (["--sizes", "16,0"], "--sizes '16,0': must be >= 1, got 0"),
    (["--sizes", ","], "--sizes ',' names no value"),
    (["--sizes", "16,16"], "--sizes names 16 more than once"),
    (["--threads", "1,0"], "--threads '1,0': must be >= 1, got 0"),
    # B7: exit 0 with 0.0 images/s.
    (["--batches", "0"], "--batches: must be >= 1, got 0"),
    (["--batch", "0"], "--batch: must be >= 1, got 0"),
])
def test_field_augment_bad_flags_are_usage_errors(argv, why, capsys,
                                                  monkeypatch):
  monkeypatch.setattr(bench_field_augment, "_photo_like",
                      lambda *a: pytest.fail("started the benchmark"))
  assert why in usage_error_line(bench_field_augment.main, argv, capsys)


def test_field_augment_tiny_run(capsys):
  bench_field_augment.main(["--batches", "1", "--batch", "2", "--sizes",
                            "16,224", "--assumed_step_ms", "32"])
  out = json.loads(capsys.readouterr().out)
  assert out["assumed_gpu_images_per_s_224"] == 2000.0  # 64 / 32 ms
  assert out["cores_to_keep_up_224"] > 0


# ---------------------------------------------------------- bench_relabel ---

def test_relabel_more_rows_than_capacity_is_a_usage_error(capsys,
                                                          monkeypatch):
  monkeypatch.setattr(bench_relabel, "build_model",
                      lambda *a: pytest.fail("started the benchmark"))
  # Was "ValueError: Cannot take a larger sample than population".
  assert "--rows 10 must be <= --capacity 5" in usage_error_line(
      bench_relabel.main, ["--rows", "10", "--capacity", "5"], capsys)


def test_relabel_default_width_is_the_readmes(monkeypatch):
  # README's figures are for width 32; the script built config_base's 16.
  seen = {}

  def stop(model_config, num_classes):
    seen["width"] = model_config.width
    raise SystemExit(0)

  monkeypatch.setattr(bench_relabel, "build_model", stop)
  for argv, width in (([], 32), (["--width", "16"], 16)):
    with pytest.raises(SystemExit):
      bench_relabel.main(argv)
    assert seen["width"] == width
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = " ".join(f.read().split())
  assert "experiments/bench_relabel.py`, small ResNet width 32" in readme


# --------------------------------------------------------- benchmark_step ---

def test_tresnet_at_a_size_it_does_not_take_is_a_usage_error(capsys):
  # Was a ValueError traceback from inside JaxStep.
  line = usage_error_line(benchmark_step.main, [
      "--impl", "jax", "--model", "tresnet_m", "--size", "30", "--batch",
      "4", "--steps", "1", "--num_classes", "8"], capsys)
  assert line.startswith("error: --model tresnet_m at --size 30: TResNet "
                         "needs image sides divisible by 4")


def test_kernel_in_bfloat16_is_named_and_timed_as_gemm():
  # Our CPU kernels are float32 only: `kernel` in bfloat16 compiles gemm's
  # program; it was labelled jax[kernel,...] and `kernel,gemm` timed it
  # twice under two names.
  name = lambda impl, dtype: benchmark_step.jax_variant_name(  # noqa: E731
      impl, "fused", "reductions", None, "memory", dtype)
  assert name("kernel", "bfloat16") == name("gemm", "bfloat16")
  assert name("kernel", "bfloat16").startswith("jax[gemm,")
  impl, why = benchmark_step.conv_impl_that_runs("kernel", "bfloat16")
  assert impl == "gemm" and "float32 only" in why
  from rebll_jax.models import cpu_kernels  # pylint: disable=g-import-not-at-top
  if jax.default_backend() == "cpu" and cpu_kernels.available():
    assert name("kernel", "float32").startswith("jax[kernel,")
    assert name("auto", "bfloat16").startswith("jax[gemm,")
    assert benchmark_step.conv_impl_that_runs("kernel", "float32") == (
        "kernel", "")


def test_kernel_and_gemm_in_bfloat16_are_timed_once(capsys, monkeypatch):
  built = []

  class FakeStep:  # no compile: records what main() would build
    def __init__(self, args, host, masks, conv_impl, *rest):
      built.append(conv_impl)
      raise SystemExit(0)

  monkeypatch.setattr(benchmark_step, "JaxStep", FakeStep)
  with pytest.raises(SystemExit):
    benchmark_step.main(["--impl", "jax", "--model", "tiny_resnet",
                         "--batch", "2", "--size", "16", "--steps", "1",
                         "--num_classes", "4", "--dtype", "bfloat16",
                         "--conv_impl", "kernel,gemm"])
  err = capsys.readouterr().err
  assert built == ["kernel"]  # one program, one runner
  assert "already listed; timed once" in err
  assert "runs as gemm" in err


def test_torch_peak_memory_does_not_depend_on_the_variant_order(
    monkeypatch):
  # The figure was the growth of the process's max RSS: a variant after
  # the first counted only what went past the earlier peak (25-40% less).
  # Now each variant's comes from a child process of its own.
  pytest.importorskip("torch")
  children = []
  real_run = subprocess.run

  def fake_run(cmd, **kwargs):
    if "--memory_probe" not in cmd:  # e.g. building the CPU kernels
      return real_run(cmd, **kwargs)
    variant = cmd[cmd.index("--torch_variants") + 1]
    children.append(variant)
    size = {"eager": 100, "eager_nchw": 200}[variant]
    return subprocess.CompletedProcess(cmd, 0, json.dumps(
        {"peak_memory_bytes": size, "peak_memory_source": "child"}), "")

  monkeypatch.setattr(subprocess, "run", fake_run)
  results = []
  for order in ("eager,eager_nchw", "eager_nchw,eager"):
    lines = benchmark_step.main([
        "--impl", "torch", "--model", "tiny_resnet", "--batch", "2",
        "--size", "16", "--steps", "1", "--warmup", "0", "--num_classes",
        "4", "--matmul_size", "8", "--torch_variants", order])
    results.append({l["impl"]: l["peak_memory_bytes"] for l in lines
                    if "impl" in l})
  assert results[0] == results[1] == {"torch_eager": 100,
                                      "torch_eager_nchw": 200}
  assert children == ["eager", "eager_nchw", "eager_nchw", "eager"]


def test_torch_memory_probe_child_measures_one_variant():
  pytest.importorskip("torch")
  proc = subprocess.run(
      [sys.executable, "experiments/benchmark_step.py", "--memory_probe",
       "--impl", "torch", "--torch_variants", "eager", "--model",
       "tiny_resnet", "--batch", "2", "--size", "16", "--num_classes", "4"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
  line = json.loads(proc.stdout)
  assert line["peak_memory_bytes"] > 0
  assert "alone" in line["peak_memory_source"]
