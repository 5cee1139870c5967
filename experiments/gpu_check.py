"""One-GPU check: environment, a tiny training run, the step benchmark, the loader.

  bash experiments/gpu_check.sh [OUT_DIR]        # on the GPU image (no network)
  python experiments/gpu_check.py --rehearsal    # CPU, tiny sizes (the tests)

Written for the GPU image of DEVELOPERS.md: Python 3.12, CUDA jax and torch,
flax, optax, orbax-checkpoint, chex, torchvision, timm, numpy, scikit-learn,
absl-py, tqdm, matplotlib, pillow, tensorboard, and no network. What
rebll_jax needs beyond that (``gpu_image.CARRIED``: ml-collections,
tensorboardX) comes as
wheels that ``experiments/fetch_gpu_wheels.py`` downloads beforehand, on a
machine with the package registry, into ``experiments/gpu_wheels/`` (git
ignores it; carry it to the GPU machine with the checkout). The check first
installs them from that folder into a temporary target
(``pip install --no-index --find-links ... --target``) and puts the target
first on the path, before anything else is imported.

Stages, each in its own subprocess under a time limit (a hang or a crash
costs that stage only), in this order, within ``--budget_s`` (default 450 s,
so the whole check ends within 8 minutes):

1. ``env``: versions, device, and the bf16 / f32 matmul peak measured here
   (the faster of JAX and PyTorch, an 8192^3 product).
2. ``train``: ``python -m rebll_jax.main --config=configs/test.py`` (rebll,
   2 tasks) on the GPU; its ``results.json`` is copied to OUT_DIR.
3. ``bench``: ``experiments/benchmark_step.py`` for TResNet-M and ResNet-50
   at batch 64, 224 px, bfloat16 first, then float32: JAX against PyTorch
   eager and ``torch.compile`` (both channels_last), ms/step, images/s,
   compile s, peak memory; this script adds MFU against the stage-1 peak.
4. ``loader``: decode + resize to 224 of photo-like JPEGs as ``prepare``
   stores them (original 640x480, ``--store_size 256``, ``--store_size 224
   --squash``) on all host cores and on one, against the images/s of the
   fastest GPU step of stage 3: does the host keep up, how many cores per GPU.

5. ``norm``: if budget is left, ``model.norm_impl`` flax against fused
   (the closed-form BatchNorm gradient, the CPU default) for TResNet-M,
   batch 64, bf16, JAX only: whether ``auto`` should pick fused on GPU too.

Every result is one JSON line on stdout as soon as it is known (and in
OUT_DIR/gpu_check.jsonl), so a cut run still reports what it finished.

``--rehearsal`` runs the same stages on the CPU at tiny sizes (a tiny
ResNet, eager PyTorch only, a few images) and imports only what the GPU
image has plus the carried packages: every other installed distribution is
hidden from the import system. The carried packages come from the wheel folder
when it holds wheels for this interpreter, else (a clean checkout, CI) from
this environment; the ``env`` line says which. tests/test_gpu_check.py runs
it, so the script cannot rot between GPU draws.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
# pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.gpu_image import (CARRIED, _norm, blocked_modules,
                                   carried_modules, hide_modules,
                                   image_closure, install_wheels)
# pylint: enable=g-import-not-at-top,wrong-import-position
WHEEL_DIR = os.path.join(ROOT, "experiments", "gpu_wheels")

MODELS = ("tresnet_m", "resnet50")
LOADER_MIN_S = 10  # below this much budget left, the loader is skipped
DTYPES = ("bfloat16", "float32")


def emit(line: dict, out_file=None):
  """Print one JSON line now (and append it to the run's .jsonl)."""
  text = json.dumps(line)
  print(text, flush=True)
  if out_file:
    with open(out_file, "a") as f:
      f.write(text + "\n")


def setup_stage(args):
  """First thing in a stage process: the wheel target on the path and, in
  a rehearsal, the import hook."""
  if args.target:
    sys.path.insert(0, args.target)
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  if args.rehearsal:
    # The image's packages, the carried ones, and this project itself.
    allowed = image_closure() | {_norm(c) for c in CARRIED} | {"rebll-jax"}
    hidden = blocked_modules(allowed)
    if args.target:  # carried packages from the wheels only
      hidden |= carried_modules()
    hide_modules(hidden)


# ----------------------------------------------------------------- stages ---

def stage_env(args):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  versions = {}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch",
               "numpy", *CARRIED):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  for name in ("ml_collections", "tensorboardX"):
    mod = __import__(name)
    versions[f"{name}_from"] = os.path.dirname(os.path.dirname(
        mod.__file__))
  d = jax.devices()[0]
  line = {"stage": "env", "python": sys.version.split()[0],
          "versions": versions, "jax_backend": jax.default_backend(),
          "device": f"{d.platform}:{d.device_kind}",
          "devices": jax.device_count(), "cpus": os.cpu_count(),
          "torch_cuda": torch.cuda.is_available(),
          "torch_device": (torch.cuda.get_device_name(0)
                           if torch.cuda.is_available() else "cpu")}
  n = 256 if args.rehearsal else 8192
  peaks = {}
  for dtype in DTYPES:
    peaks[dtype] = max(_jax_matmul(jax, np, n, dtype),
                       _torch_matmul(torch, n, dtype))
  line["matmul_n"] = n
  line["peak_tflops"] = {k: round(v / 1e12, 3) for k, v in peaks.items()}
  return line


def _best_of(fn, reps=5):
  fn()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def _jax_matmul(jax, np, n, dtype):
  a = jax.numpy.ones((n, n), getattr(jax.numpy, dtype))
  f = jax.jit(lambda a: a @ a)
  return 2 * n**3 / _best_of(lambda: f(a).block_until_ready())


def _torch_matmul(torch, n, dtype):
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  a = torch.ones((n, n), dtype=getattr(torch, dtype), device=dev)
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

  def run():
    a @ a
    sync()
  return 2 * n**3 / _best_of(run)


def stage_train(args):
  workdir = os.path.join(args.out, "train")
  shutil.rmtree(workdir, ignore_errors=True)
  argv = ["rebll_jax.main", "--config=configs/test.py",
          "--config.method=rebll", "--config.protocol.num_tasks=2",
          f"--workdir={workdir}"]
  if args.rehearsal:  # seconds on 2 loaded CPU cores
    argv += ["--config.data.image_size=16",
             "--config.data.synthetic.render_size=16",
             "--config.data.synthetic.num_train=64",
             "--config.data.synthetic.num_test=32",
             "--config.model.width=4", "--config.model.stage_sizes=(1,)",
             "--config.train.global_batch=8", "--config.train.eval_batch=32",
             "--config.train.checkpoint_every=0"]
  t = time.perf_counter()
  sys.argv = argv
  from rebll_jax import main as rebll_main  # pylint: disable=g-import-not-at-top
  try:
    rebll_main.run()
  except SystemExit as e:
    if e.code not in (0, None):
      raise
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  shutil.copy(os.path.join(workdir, "results.json"),
              os.path.join(args.out, "results.json"))
  return {"stage": "train", "seconds": round(time.perf_counter() - t, 1),
          "results_json": os.path.join(args.out, "results.json"),
          "method": results["method"], "devices": results.get("devices"),
          "map_seen": [round(t_["map_seen"], 2) for t_ in results["tasks"]],
          "train_seconds": [round(t_["train_seconds"], 2)
                            for t_ in results["tasks"]],
          "avg_map": results["avg_map"], "last_map": results["last_map"],
          "compilations": results.get("compilations")}


def stage_bench(args):
  from experiments import benchmark_step  # pylint: disable=g-import-not-at-top
  if args.rehearsal:
    argv = ["--model", "tiny_resnet", "--batch", "4", "--size", "16",
            "--steps", "2", "--warmup", "0", "--num_classes", "8",
            "--matmul_size", "64", "--torch_variants", "eager"]
  else:
    argv = ["--model", args.model, "--batch", "64", "--size", "224",
            "--steps", "15", "--warmup", "3", "--matmul_size", "8192",
            "--torch_variants", "eager,compile"]
  argv += ["--impl", "both", "--dtype", args.dtype]
  lines = benchmark_step.main(argv)
  peak = args.peak_tflops or None
  rows = [l for l in lines if "impl" in l]
  for l in rows:
    if peak:  # from unrounded figures (tiny rehearsal steps round to 0)
      l["mfu_vs_env_peak"] = float(f"{l['flops_per_step'] / (l['ms_per_step'] * 1e-3) / (peak * 1e12):.4g}")
  jax_rows = [l for l in rows if l["impl"].startswith("jax")]
  torch_rows = [l for l in rows if l["impl"].startswith("torch")]
  summary = {"stage": "bench", "model": rows[0]["model"],
             "dtype": args.dtype, "batch": rows[0]["batch"],
             "size": rows[0]["size"],
             "rows": [{k: l.get(k) for k in (
                 "impl", "ms_per_step", "images_per_s", "compile_s",
                 "peak_memory_bytes", "achieved_tflops", "fraction_of_peak",
                 "mfu_vs_env_peak")} for l in rows]}
  if jax_rows and torch_rows:
    best = max(torch_rows, key=lambda l: l["images_per_s"])
    eager = [l for l in torch_rows if l["impl"] == "torch_eager"]
    summary["fastest_torch"] = best["impl"]
    summary["jax_vs_fastest_torch"] = round(
        jax_rows[0]["images_per_s"] / best["images_per_s"], 3)
    if eager:
      summary["jax_vs_torch_eager"] = round(
          jax_rows[0]["images_per_s"] / eager[0]["images_per_s"], 3)
    summary["jax_images_per_s"] = jax_rows[0]["images_per_s"]
  return summary


def stage_norm(args):
  """Which BatchNorm is faster on this device: ``model.norm_impl`` flax
  (the default off CPU) against the closed-form-gradient one, JAX only."""
  from experiments import benchmark_step  # pylint: disable=g-import-not-at-top
  if args.rehearsal:
    argv = ["--model", "tiny_resnet", "--batch", "4", "--size", "16",
            "--steps", "2", "--warmup", "0", "--num_classes", "8",
            "--dtype", "float32"]
  else:
    argv = ["--model", "tresnet_m", "--batch", "64", "--size", "224",
            "--steps", "10", "--warmup", "2", "--dtype", "bfloat16"]
  # A tiny matmul: this stage compares two JAX variants, not against a peak.
  argv += ["--impl", "jax", "--norm_impl", "flax,fused", "--matmul_size", "64"]
  rows = [l for l in benchmark_step.main(argv) if "impl" in l]
  by_norm = {("fused" if "norm=fused" in l["impl"] else "flax"): l
             for l in rows}
  summary = {"stage": "norm", "model": rows[0]["model"],
             "dtype": rows[0]["dtype"], "batch": rows[0]["batch"],
             "size": rows[0]["size"],
             "ms_per_step": {k: l["ms_per_step"] for k, l in by_norm.items()},
             "compile_s": {k: l["compile_s"] for k, l in by_norm.items()}}
  if set(by_norm) == {"flax", "fused"}:
    summary["fused_speedup"] = round(
        by_norm["flax"]["ms_per_step"] / by_norm["fused"]["ms_per_step"], 3)
  return summary


def stage_loader(args):
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from rebll_jax import prepare  # pylint: disable=g-import-not-at-top
  from rebll_jax.data import prepared  # pylint: disable=g-import-not-at-top
  n = 16 if args.rehearsal else 256
  size = 32 if args.rehearsal else 224
  rng = np.random.default_rng(0)
  originals = []
  for _ in range(n):  # smooth content + noise: compresses like a photo
    small = rng.integers(0, 256, (30, 40, 3), np.uint8)
    arr = np.asarray(Image.fromarray(small).resize((640, 480),
                                                   Image.BICUBIC), np.int16)
    arr = np.clip(arr + rng.integers(-12, 13, arr.shape), 0, 255)
    b = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(b, "JPEG", quality=90)
    originals.append(b.getvalue())
  storages = {"original_640x480": originals}
  for store_size, squash in ((256, False), (size, True)):
    name = f"store_size_{store_size}" + ("_squash" if squash else "")
    storages[name] = [prepare.encode_stored(r, store_size, squash)
                      for r in originals]
  cores = os.cpu_count() or 1
  line = {"stage": "loader", "images": n, "image_size": size,
          "cores": cores, "storages": {}}
  for name, raws in storages.items():
    per = {"kb_per_image": round(sum(map(len, raws)) / len(raws) / 1024, 1)}
    for workers in sorted({1, cores}):
      with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda r: prepared.decode_resize(r, size), raws[:8]))
        t, c = time.perf_counter(), time.process_time()
        reps = 2
        for _ in range(reps):
          list(pool.map(lambda r: prepared.decode_resize(r, size), raws))
        per[f"images_per_s_{workers}_workers"] = round(
            reps * len(raws) / (time.perf_counter() - t), 1)
        if workers == 1:  # per CPU-second: what one core does, under load
          per["images_per_cpu_s"] = round(
              reps * len(raws) / (time.process_time() - c), 1)
    line["storages"][name] = per
  gpu = args.gpu_images_per_s
  if gpu:
    line["gpu_step_images_per_s"] = gpu
    for name, per in line["storages"].items():
      per["cores_per_gpu"] = round(gpu / per["images_per_cpu_s"], 1)
      per["keeps_up_with_all_cores"] = per[
          f"images_per_s_{cores}_workers"] >= gpu
  return line


STAGES = {"env": stage_env, "train": stage_train, "bench": stage_bench,
          "norm": stage_norm,
          "loader": stage_loader}


# ------------------------------------------------------------------ parent ---

# What a stage leaves in OUT_DIR: removed before the stage runs, so a
# rerun into the same folder never shows an earlier run's output beside
# this run's failure or timeout.
STAGE_OUTPUTS = {"train": ("results.json", "train")}


def _clear_outputs(out, name):
  for entry in STAGE_OUTPUTS.get(name, ()):
    path = os.path.join(out, entry)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    elif os.path.lexists(path):
      os.remove(path)


def _run_stage(args, name, extra, timeout, out_file):
  """Runs one stage in a subprocess under ``timeout`` seconds (at least 1:
  the limit applied is the one its timeout line reports)."""
  _clear_outputs(args.out, name)
  limit = max(timeout, 1)
  cmd = [sys.executable, os.path.abspath(__file__), "--stage", name,
         "--out", args.out, "--target", args.target or ""] + extra
  if args.rehearsal:
    cmd.append("--rehearsal")
  t = time.perf_counter()
  cpu0 = _children_cpu()
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (args.target, ROOT, env.get("PYTHONPATH", "")) if p)
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          timeout=limit, env=env, check=False)
    result = None
    for text in proc.stdout.splitlines():
      if text.startswith("{"):
        try:
          row = json.loads(text)
        except json.JSONDecodeError:
          continue
        if row.get("stage") == name and "status" not in row:
          result = row
          row["stage_wall_s"] = round(time.perf_counter() - t, 1)
          row["stage_cpu_s"] = round(_children_cpu() - cpu0, 1)
        emit(row if "stage" in row else {"stage": name, "detail": row},
             out_file)
    if proc.returncode or result is None:
      err = [l for l in proc.stderr.splitlines() if l.strip()][-3:]
      emit({"stage": name, "status": "failed", "rc": proc.returncode,
            "stderr_tail": err, "seconds": round(time.perf_counter() - t, 1)},
           out_file)
      return None
    return result
  except subprocess.TimeoutExpired:
    emit({"stage": name, "status": "timeout", "limit_s": round(limit, 1),
          **{k: v for k, v in zip(extra[::2], extra[1::2])}}, out_file)
    return None


def _children_cpu() -> float:
  import resource  # pylint: disable=g-import-not-at-top
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="gpu_check_out")
  p.add_argument("--rehearsal", action="store_true",
                 help="CPU, tiny sizes, only the GPU image's packages")
  p.add_argument("--wheels", default=WHEEL_DIR)
  p.add_argument("--budget_s", type=float, default=450.0)
  # Internal: one stage in this process.
  p.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
  p.add_argument("--target", default="", help=argparse.SUPPRESS)
  p.add_argument("--model", default="tresnet_m", help=argparse.SUPPRESS)
  p.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help=argparse.SUPPRESS)
  p.add_argument("--gpu_images_per_s", type=float, default=0.0,
                 help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.out = os.path.abspath(args.out)
  if args.stage:
    setup_stage(args)
    emit(STAGES[args.stage](args))
    return 0

  if not 0 < args.budget_s < float("inf"):
    print(f"error: --budget_s must be a number of seconds > 0, got "
          f"{args.budget_s}", file=sys.stderr)
    return 2
  t0 = time.perf_counter()
  out_file = os.path.join(args.out, "gpu_check.jsonl")
  try:
    os.makedirs(args.out, exist_ok=True)
    open(out_file, "w").close()
  except OSError as e:
    print(f"error: --out {args.out}: cannot make or write that folder "
          f"({' '.join(str(e).split())}); choose another", file=sys.stderr)
    return 2
  left = lambda: args.budget_s - (time.perf_counter() - t0)  # noqa: E731
  tmp = tempfile.mkdtemp(prefix="gpu_check_wheels_")
  try:
    have_wheels = bool(glob.glob(os.path.join(args.wheels, "*.whl")))
    if have_wheels:
      try:
        emit({"stage": "wheels", **install_wheels(args.wheels, tmp)},
             out_file)
        args.target = tmp
      except RuntimeError as e:
        if not args.rehearsal:
          emit({"stage": "wheels", "status": "failed", "error": str(e)},
               out_file)
          return 1
        emit({"stage": "wheels", "status": "skipped", "error": str(e),
              "carried_from": "this environment"}, out_file)
    elif not args.rehearsal:
      emit({"stage": "wheels", "status": "failed",
            "error": f"no wheels in {args.wheels}: run "
                     "experiments/fetch_gpu_wheels.py where the package "
                     "registry is reachable and carry the folder"}, out_file)
      return 1
    else:
      emit({"stage": "wheels", "status": "none",
            "carried_from": "this environment"}, out_file)
    caps = {"env": 60, "train": 150, "bench": 150, "loader": 60, "norm": 120}
    env = _run_stage(args, "env", [], min(caps["env"], left()), out_file)
    peaks = (env or {}).get("peak_tflops", {})
    _run_stage(args, "train", [], min(caps["train"], left()), out_file)
    plan = [(m, d) for d in DTYPES for m in MODELS]
    if args.rehearsal:
      plan = [("tiny_resnet", "float32")]
    best_gpu = 0.0
    for i, (model, dtype) in enumerate(plan):
      # The loader runs after the bf16 pair (its budget kept in reserve),
      # whether or not the benches before it ran.
      reserve = 0 if i >= len(MODELS) else caps["loader"] // 2
      limit = min(caps["bench"], left() - reserve)
      if limit < 20:
        emit({"stage": "bench", "status": "skipped", "model": model,
              "dtype": dtype, "reason": "time budget",
              "budget_left_s": round(left(), 1)}, out_file)
      else:
        row = _run_stage(args, "bench",
                         ["--model", model, "--dtype", dtype, "--peak_tflops",
                          str(peaks.get(dtype, 0.0))], limit, out_file)
        if row and row.get("jax_images_per_s"):
          best_gpu = max(best_gpu, row["jax_images_per_s"])
      if i == len(MODELS) - 1 or len(plan) == 1:
        if left() >= LOADER_MIN_S:
          # Without a GPU step to compare with, it measures the host only.
          _run_stage(args, "loader", ["--gpu_images_per_s", str(best_gpu)],
                     min(caps["loader"], left()), out_file)
        else:
          emit({"stage": "loader", "status": "skipped",
                "reason": "time budget", "budget_left_s": round(left(), 1)},
               out_file)
    # Last and optional: whatever budget the main stages left.
    if left() >= 30 or args.rehearsal:
      _run_stage(args, "norm", [], min(caps["norm"], max(left(), 30)),
                 out_file)
    else:
      emit({"stage": "norm", "status": "skipped", "reason": "time budget"},
           out_file)
    emit({"stage": "done", "seconds": round(time.perf_counter() - t0, 1),
          "out": out_file}, out_file)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
