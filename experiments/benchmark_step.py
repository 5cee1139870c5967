"""Side-by-side timing of one incremental RebLL train step: JAX vs PyTorch.

  python experiments/benchmark_step.py --impl both --model resnet50 \\
      --batch 16 --size 64 --dtype float32 --steps 10

One step = past-model forward, current-model forward and backward, AKD
(asymmetric BCE + decayed distillation), online relabeling of new rows (past
model) and memory rows (current model), optimizer update. JAX runs
``rebll_jax.steps.make_train_step`` (method ``rebll``, ``has_old=True``)
under one ``jax.jit`` with the state donated; PyTorch runs
``experiments/torch_baseline/rebll_step.py`` in the variants of
``--torch_variants`` (``eager``: channels_last, fused Adam; ``eager_nchw``;
``compile`` / ``compile_nchw``: ``torch.compile``; ``--torch_compile`` adds
``compile``). Same architecture, loss, batch (a quarter of the rows from
memory), resolution and precision; augmentation is off on both sides
(uint8 -> [0, 1] only) and the relabel warm-up is 0, so every branch runs
every step. ``--model small_resnet`` is the net of the default experiment
(configs/synthetic.py: width 16, stages (1, 1, 1), stem stride 2);
``tiny_resnet`` (width 4, one stage) is for tests.

All variants run in the same process and are timed alternately, step by
step (on a shared machine the load then hits all alike); the reported time
is the median after ``--warmup`` steps, with this process's CPU time per
step beside it (what a loaded machine distorts least). Each variant prints
one JSON line: median ms/step, CPU ms/step, images/s, compile (first-call)
seconds, peak memory (PyTorch: each variant alone, in a fresh child process
by default, ``--torch_memory``; JAX: XLA's memory analysis of that variant's
compiled step; on a GPU or TPU also ``process_device_peak_bytes``, the
allocator's peak of all JAX variants together), analytic FLOPs per step (2 x MACs of the forward pass
x batch x 4: past forward 1, current forward 1, backward 2) and the fraction
of the machine's measured peak (the faster of a large JAX and PyTorch matmul
timed in this run, in the step's dtype). Then one line per JAX variant: its
throughput ratio to the FASTEST PyTorch variant of the run (named), the
CPU-time ratio, the ratio to every PyTorch variant, and ``paired_ratio``:
the same ratio round by round (PyTorch's step over JAX's step of the same
round), as median, quartiles and range over the rounds, so a run says how
far its ratio can be trusted on a noisy machine.

``--conv_impl xla,matmul_grad`` times several JAX variants in one run
(``model.conv_impl``; default: this backend's ``auto`` choice), each for
every value of ``--cpu_library_fusion reductions,xla_default``
(``model.cpu_library_fusion``, CPU only; default: the run default) and of
``--cpu_scheduler memory,xla_default`` (``model.cpu_scheduler``);
``--xla_options '[{"xla_cpu_...": ...}]'`` adds one JAX variant per dict of
XLA compiler options (compiled in this process, so still interleaved);
``--xla_flags`` appends to XLA_FLAGS for the whole process.
``--cpu_devices N`` splits the CPU into N XLA devices with the batch sharded
over them (set before JAX starts). ``--host_malloc`` (default ``retain``, a
run's default) sets the C allocator for the whole process, so both sides
run with the same allocator (rebll_jax/host_malloc.py).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
from experiments import cli_checks  # noqa: E402  pylint: disable=wrong-import-position

MODELS = ("tresnet_m", "resnet50", "resnet18", "small_resnet", "tiny_resnet")


def model_config(c, model):
  """Sets config.model for a benchmark model name (tiny_resnet: width 4,
  one stage, for tests and rehearsals)."""
  c.model.arch = "small_resnet" if model == "tiny_resnet" else model
  if model == "tiny_resnet":
    c.model.width, c.model.stage_sizes = 4, (1,)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--impl", choices=("jax", "torch", "both"), default="both")
  p.add_argument("--model", choices=MODELS, default="resnet50")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--dtype", choices=("float32", "bfloat16"),
                 default="float32")
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2,
                 help="untimed steps after the first (compile) call")
  p.add_argument("--num_classes", type=int, default=80)
  p.add_argument("--torch_variants", default="eager,eager_nchw",
                 help="comma list of PyTorch variants: "
                      "eager (channels_last), eager_nchw, compile, "
                      "compile_nchw")
  p.add_argument("--torch_compile", action="store_true",
                 help="add the 'compile' variant (torch.compile)")
  p.add_argument("--conv_impl", default="auto",
                 help="comma list of model.conv_impl values to time (JAX)")
  p.add_argument("--cpu_library_fusion", default="reductions",
                 help="comma list of model.cpu_library_fusion values to time "
                      "(JAX on CPU; one variant per conv_impl and value)")
  p.add_argument("--cpu_scheduler", default="memory",
                 help="comma list of model.cpu_scheduler values to time "
                      "(JAX on CPU: memory, xla_default)")
  p.add_argument("--norm_impl", default="auto",
                 help="comma list of model.norm_impl values to time "
                      "(JAX: auto, flax, fused)")
  p.add_argument("--cpu_devices", type=int, default=0,
                 help="XLA CPU devices (0: leave XLA_FLAGS alone)")
  p.add_argument("--host_malloc", choices=("retain", "system"),
                 default="retain",
                 help="the C allocator's handling of freed memory, for the "
                      "whole process (both sides): config.host_malloc")
  p.add_argument("--xla_flags", default="",
                 help="appended to XLA_FLAGS before JAX starts")
  p.add_argument("--xla_options", default="",
                 help="JSON list of dicts of XLA compiler options: one more "
                      "JAX variant each (first --conv_impl)")
  p.add_argument("--matmul_size", type=int, default=0,
                 help="side of the peak-FLOPs matmul (0: 2048 CPU, 8192 GPU)")
  p.add_argument("--torch_memory", choices=("process", "inline"),
                 default="process",
                 help="PyTorch peak memory: 'process' measures each variant "
                      "alone in a fresh child process (build + 2 steps; "
                      "does not depend on the variant's place in the list), "
                      "'inline' its second step in this process (no extra "
                      "process; depends on what ran before it)")
  p.add_argument("--memory_probe", action="store_true",
                 help=argparse.SUPPRESS)  # the child of --torch_memory process
  p.add_argument("--out", default="", help="also append the JSON lines here")
  args = p.parse_args(argv)
  for flag in ("batch", "size", "steps", "num_classes"):
    if getattr(args, flag) < 1:
      p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
  if args.warmup < 0 or args.cpu_devices < 0:
    p.error("--warmup and --cpu_devices must be >= 0")
  if args.matmul_size < 0:
    p.error(f"--matmul_size must be >= 0 (0: the default), got "
            f"{args.matmul_size}")
  old, current = make_masks(args.num_classes)
  if not (old.any() and current.any()):
    p.error(f"--num_classes must be >= 3, got {args.num_classes}: the step "
            "needs old classes (the first half) and current ones (the next "
            "quarter)")
  if args.cpu_devices and args.batch % args.cpu_devices:
    p.error(f"--batch {args.batch} must divide over --cpu_devices "
            f"{args.cpu_devices}")
  names = [v.strip() for v in args.torch_variants.split(",") if v.strip()]
  unknown = [v for v in names if v not in TORCH_VARIANTS]
  if unknown:
    p.error(f"unknown --torch_variants {unknown}; valid: "
            f"{sorted(TORCH_VARIANTS)}")
  if args.impl != "jax" and not (names or args.torch_compile):
    p.error(f"--torch_variants {args.torch_variants!r} names no variant; "
            f"valid: {sorted(TORCH_VARIANTS)}")
  try:
    options = json.loads(args.xla_options or "[]")
  except json.JSONDecodeError as e:
    p.error(f"--xla_options is not JSON ({e})")
  if not (isinstance(options, list)
          and all(isinstance(o, dict) for o in options)):
    p.error("--xla_options must be a JSON list of objects, e.g. "
            "'[{\"xla_cpu_enable_fast_math\": true}]'")
  return args


# ------------------------------------------------------------------ inputs ---

def make_masks(num_classes):
  """The task's class masks (numpy bool): old = first half, current = next
  quarter (both empty below 3 classes)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  old = np.zeros(num_classes, bool)
  cur = np.zeros(num_classes, bool)
  old[:num_classes // 2] = True
  cur[num_classes // 2:3 * num_classes // 4] = True
  return old, cur


def make_inputs(batch, size, num_classes, seed=0):
  """A host batch (numpy) and the task's class masks: old = first half,
  current = next quarter, seen = both; a quarter of the rows from memory."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  old, cur = make_masks(num_classes)
  is_memory = np.zeros(batch, bool)
  is_memory[:max(batch // 4, 1)] = True
  labels = (rng.random((batch, num_classes)) < 0.1).astype(np.float32)
  known = np.where(is_memory[:, None], old[None], cur[None])
  labels *= known
  host = {"images": rng.integers(0, 256, (batch, size, size, 3), np.uint8),
          "labels": labels, "known": known, "is_memory": is_memory,
          "true_labels": labels.astype(np.uint8)}
  return host, {"old": old, "current": cur, "seen": old | cur}


def _median(xs):
  xs = sorted(xs)
  n = len(xs)
  return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


# --------------------------------------------------------------------- JAX ---

def conv_impl_that_runs(conv_impl, dtype="float32"):
  """(the conv route the program compiles to, why it differs from
  ``conv_impl`` or ""): "auto" resolved, and "kernel" is "gemm" where our
  CPU kernels take no convolution (they are float32 only, and need to
  build): the same program, so one name."""
  from rebll_jax.models import conv, cpu_kernels  # pylint: disable=g-import-not-at-top
  impl = conv.resolve_impl(conv_impl)
  if impl == "kernel" and dtype != "float32":
    return "gemm", (f"--conv_impl {conv_impl} runs as gemm in {dtype} (our "
                    "CPU kernels are float32 only: the same program)")
  if impl == "kernel" and not cpu_kernels.available():
    return "gemm", (f"--conv_impl {conv_impl} runs as gemm (CPU kernels "
                    f"unavailable: {cpu_kernels.unavailable_reason()})")
  return impl, ""


def jax_variant_name(conv_impl, norm_impl, cpu_library_fusion, xla_options,
                     cpu_scheduler="memory", dtype="float32"):
  """What the JAX variant computes with on this backend, e.g.
  ``jax[gemm,norm=fused,reductions,sched=memory]`` ("auto" resolved, and
  "kernel" named "gemm" where it compiles to gemm's program, e.g. in
  bfloat16; the library fusion and the scheduler only on CPU, where they
  mean something)."""
  import jax  # pylint: disable=g-import-not-at-top
  from rebll_jax.models import norm  # pylint: disable=g-import-not-at-top
  parts = [conv_impl_that_runs(conv_impl, dtype)[0],
           f"norm={norm.resolve_impl(norm_impl)}"]
  if jax.default_backend() == "cpu":
    parts += [cpu_library_fusion, f"sched={cpu_scheduler}"]
  parts += [f"{k}={v}" for k, v in (xla_options or {}).items()]
  return f"jax[{','.join(parts)}]"


def _once(variants, name_of):
  """``variants`` without the ones that name an already listed variant
  (e.g. ``--norm_impl auto,fused`` on CPU): timing one program twice under
  one name would pool its steps. Says what it dropped on stderr."""
  kept, names = [], set()
  for variant in variants:
    name = name_of(variant)
    if name in names:
      print(f"note: {variant} is {name} here, already listed; timed once",
            file=sys.stderr)
      continue
    names.add(name)
    kept.append(variant)
  return kept


class JaxStep:
  """The jitted RebLL step; ``run()`` does one step and blocks on it."""

  def __init__(self, args, host, masks, conv_impl, xla_options=None,
               cpu_library_fusion="reductions", norm_impl="auto",
               cpu_scheduler="memory"):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from rebll_jax import config_base, methods, models, optim, parallel, steps, xla_cpu  # pylint: disable=g-import-not-at-top,multiple-imports,line-too-long
    self.jax = jax
    c = config_base.base_config()
    model_config(c, args.model)
    c.model.dtype = args.dtype
    c.model.conv_impl = conv_impl
    c.model.norm_impl = norm_impl
    c.model.cpu_library_fusion = cpu_library_fusion
    c.model.cpu_scheduler = cpu_scheduler
    c.augment.flip, c.augment.cutout, c.augment.randaugment_ops = False, 0, 0
    c.relabel.warmup_frac = 0.0
    self.name = jax_variant_name(conv_impl, norm_impl, cpu_library_fusion,
                                 xla_options, cpu_scheduler, args.dtype)
    model = models.build_model(c.model, args.num_classes)
    tx = optim.make_transform(c.optim)
    # One device (one GPU, or the whole CPU as one XLA device) unless the
    # CPU was split with --cpu_devices.
    mesh = parallel.make_mesh(args.cpu_devices or 1)
    self.devices = mesh.size
    if args.batch % mesh.size:
      raise SystemExit(f"--batch {args.batch} must divide over {mesh.size} "
                       "devices")
    rep = parallel.replicated(mesh)
    variables = models.init_variables(model, jax.random.key(0), args.size)
    state = steps.initial_train_state(tx, variables)
    self.state = jax.device_put(state, rep)
    self.old = jax.device_put(steps.copy_tree(variables), rep)
    self.batch = parallel.to_global(mesh, host)
    self.context = jax.device_put({
        "current_mask": jnp.asarray(masks["current"]),
        "old_mask": jnp.asarray(masks["old"]),
        "seen_mask": jnp.asarray(masks["seen"]),
        "task_start": jnp.asarray(0, jnp.int32),
        "total_steps": jnp.asarray(1000, jnp.int32),
        "lr_peak": jnp.asarray(1e-3, jnp.float32)}, rep)
    self.key = jax.random.key(1)
    fn = steps.make_train_step(model=model, method=methods.get_method("rebll"),
                               config=c, tx=tx, has_old=True)
    jitted = jax.jit(fn, donate_argnums=0, out_shardings=(rep, rep))
    t0 = time.perf_counter()
    try:
      self.compiled = jitted.lower(self.state, self.old, self.batch,
                                   self.context, self.key).compile(
                                       compiler_options={
                                           **(xla_cpu.options_for(c.model)
                                              or {}),
                                           **(xla_options or {})} or None)
    except jax.errors.JaxRuntimeError as e:
      if "compile option" not in str(e):
        raise
      _usage_error(f"--xla_options {xla_options}: "
                   f"{' '.join(str(e).split())}")
    self.compile_s = time.perf_counter() - t0
    self.np = np

  def run(self):
    self.state, metrics = self.compiled(self.state, self.old, self.batch,
                                        self.context, self.key)
    loss = float(metrics["loss"])  # blocks; a host fetch as a trainer's log
    if not self.np.isfinite(loss):
      raise FloatingPointError(f"{self.name}: non-finite loss")
    return loss

  def memory(self):
    """This program's own figure (XLA's analysis of the compiled step), so
    it does not depend on the other variants of the run; the device's
    process-wide peak is ``process_device_peak()``."""
    m = self.compiled.memory_analysis()
    if m is None:
      return None, "unavailable"
    total = (m.argument_size_in_bytes + m.output_size_in_bytes
             - m.alias_size_in_bytes + m.temp_size_in_bytes)
    return int(total), "XLA memory_analysis (args + outputs - aliased + temp)"

  def process_device_peak(self):
    """The device allocator's peak_bytes_in_use (GPU, TPU): process-wide,
    every JAX variant of the run together; None where there is none (CPU)."""
    dev = self.jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    return (stats or {}).get("peak_bytes_in_use")

  def matmul_flops_per_s(self, n, dtype):
    jnp = self.jax.numpy
    dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    a = jnp.ones((n, n), dt)
    f = self.jax.jit(lambda a, b: a @ b)
    f(a, a).block_until_ready()
    times = []
    for _ in range(5):
      t0 = time.perf_counter()
      f(a, a).block_until_ready()
      times.append(time.perf_counter() - t0)
    return 2 * n**3 / _median(times)

  def device_name(self):
    d = self.jax.devices()[0]
    return f"{d.platform}:{d.device_kind}"


# ----------------------------------------------------------------- PyTorch ---

def _rss_bytes(field):
  """``VmRSS`` / ``VmHWM`` of /proc/self/status in bytes (Linux)."""
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise OSError(f"no {field} in /proc/self/status")


def _reset_rss_peak():
  """Gives the C heap's free memory back to the kernel (glibc
  ``malloc_trim``: with ``--host_malloc retain`` an earlier variant's freed
  blocks would otherwise serve the next one, unseen by the RSS) and resets
  the process's resident high-water mark (``/proc/self/clear_refs`` 5).
  Returns the resident bytes now, or None where either is unavailable."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc_trim(ctypes.c_size_t(0))
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    return _rss_bytes("VmRSS")
  except (OSError, AttributeError):
    return None


# variant name -> (torch.compile?, memory format) of rebll_step.RebllStep.
TORCH_VARIANTS = {
    "eager": (False, "channels_last"),
    "eager_nchw": (False, "contiguous"),
    "compile": (True, "channels_last"),
    "compile_nchw": (True, "contiguous"),
}


class TorchStep:
  """rebll_step.RebllStep in one variant; ``run()`` does one step and syncs."""

  def __init__(self, args, host, masks, variant, inline_memory=True):
    import torch  # pylint: disable=g-import-not-at-top
    from experiments.torch_baseline import rebll_step  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.device = "cuda" if torch.cuda.is_available() else "cpu"
    self.name = f"torch_{variant}"
    compile_, memory_format = TORCH_VARIANTS[variant]
    # rebll_step.SmallResNet's defaults are the net of configs/synthetic.py.
    self.step = rebll_step.RebllStep(
        args.model, args.num_classes,
        {k: torch.as_tensor(v) for k, v in masks.items()},
        device=self.device, dtype=args.dtype, compile=compile_,
        memory_format=memory_format, total_steps=1000, warmup_frac=0.0)
    self.batch = self.step.to_device(host)
    t0 = time.perf_counter()
    self.run()
    self.compile_s = time.perf_counter() - t0  # first call (compile if any)
    if not inline_memory:  # measured by the caller
      self.run()
      self.peak = (None, "not measured")
      return
    # Peak memory of this variant's second (steady-state) step above what
    # the process holds when it starts: its activations, gradients and
    # temporaries, whatever the variant's place in the list. The first step
    # pays the process's one-time costs (kernel code paged in, caches,
    # the optimizer's state), which would fall on whichever variant came
    # first; the peak counters are reset between the two.
    if self.device == "cuda":
      torch.cuda.synchronize()
      torch.cuda.reset_peak_memory_stats()
      base = torch.cuda.memory_allocated()
    else:
      base = _reset_rss_peak()  # None: no reset on this OS
      maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    self.run()
    if self.device == "cuda":
      self.peak = (torch.cuda.max_memory_allocated() - base,
                   "torch.cuda.max_memory_allocated during this variant's "
                   "second step, above what was allocated before it (step "
                   "transients; parameters and optimizer state "
                   "excluded; --torch_memory inline)")
    elif base is not None:
      self.peak = (_rss_bytes("VmHWM") - base,
                   "peak resident memory during this variant's second step, "
                   "above the process's before it (free heap trimmed, "
                   "high-water mark reset; step transients; parameters and "
                   "optimizer state excluded; CPU; still depends on what "
                   "ran before it in this process: the same variant 36 -> "
                   "60 MB in 3rd place, resnet18 batch 4 64 px)")
    else:  # order-dependent: only growth past earlier variants' peaks
      self.peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                   - maxrss0,
                   "process max-RSS growth over this variant's second step "
                   "(CPU; no peak reset here, so only growth past the "
                   "earlier variants' peaks counts: depends on the order)")

  def _sync(self):
    if self.device == "cuda":
      self.torch.cuda.synchronize()

  def run(self):
    loss = float(self.step(self.batch))  # .item(): syncs like the JAX fetch
    self._sync()
    return loss

  def memory(self):
    return self.peak

  def matmul_flops_per_s(self, n, dtype):
    torch = self.torch
    dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    a = torch.ones((n, n), dtype=dt, device=self.device)
    a @ a
    self._sync()
    times = []
    for _ in range(5):
      t0 = time.perf_counter()
      a @ a
      self._sync()
      times.append(time.perf_counter() - t0)
    return 2 * n**3 / _median(times)

  def device_name(self):
    if self.device == "cuda":
      return f"cuda:{self.torch.cuda.get_device_name(0)}"
    return f"cpu:{platform.processor() or platform.machine()}"


# -------------------------------------------------------------------- main ---

def torch_variants(args):
  """The PyTorch variants to time (parse_args checked the names)."""
  names = [v.strip() for v in args.torch_variants.split(",") if v.strip()]
  if args.torch_compile and "compile" not in names:
    names.append("compile")
  return names


# A user's mistake found after parse_args (the checks that need JAX's
# modules, imported only once XLA_FLAGS is set): one line, exit 2.
_usage_error = cli_checks.usage_error


def main(argv=None):
  args = parse_args(argv)
  if args.memory_probe:
    line = _memory_probe(args)
    print(json.dumps(line), flush=True)
    return [line]
  # Opened now: a bad path found after minutes of timing would lose them.
  try:
    out = open(args.out, "a", encoding="utf-8") if args.out else None
  except OSError as e:
    _usage_error(f"--out {args.out}: {e.strerror}")
  for flag, value in (("--cpu_devices", args.cpu_devices),
                      ("--xla_flags", args.xla_flags)):
    if value and "jax" in sys.modules:
      raise SystemExit(f"{flag} must be set before JAX is imported")
  if args.cpu_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count="
                               f"{args.cpu_devices}")
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " +
                               args.xla_flags).strip()
  # PyTorch's OpenMP threads spin while idle by default; in one process with
  # XLA's thread pool (alternating steps) the spinning starves the other
  # side (measured: torch 30 ms/step alone, 1000+ ms beside JAX on 2 cores).
  # Passive waiting costs torch nothing measurable when it runs alone.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  from rebll_jax import host_malloc, xla_cpu  # pylint: disable=g-import-not-at-top,multiple-imports
  from rebll_jax.models import conv, norm  # pylint: disable=g-import-not-at-top
  for flag, valid in (("cpu_library_fusion", xla_cpu.CPU_LIBRARY_FUSIONS),
                      ("cpu_scheduler", xla_cpu.CPU_SCHEDULERS),
                      ("conv_impl", conv.IMPLS), ("norm_impl", norm.IMPLS)):
    for value in getattr(args, flag).split(","):
      if value.strip() not in valid:
        _usage_error(f"unknown --{flag} {value.strip()!r}; "
                     f"valid: {list(valid)}")
  _check_xla_options(json.loads(args.xla_options or "[]"))
  try:  # the model at this size, traced (no compile): MACs per image
    macs = _macs_only(args)
  except ValueError as e:  # a size the model does not take (TResNet: 4k)
    _usage_error(f"--model {args.model} at --size {args.size}: "
                 f"{' '.join(str(e).split())}")
  # The run's default (config.host_malloc); one process, so both sides.
  problem = host_malloc.configure(args.host_malloc)
  if problem:
    print(f"warning: {problem}", file=sys.stderr)
  host, masks = make_inputs(args.batch, args.size, args.num_classes)
  runners = []
  # PyTorch first: its max-RSS growth is then its own (CPU memory figure).
  if args.impl in ("torch", "both"):
    inline = args.torch_memory == "inline"
    for variant in _once(torch_variants(args), lambda v: v):
      runners.append(TorchStep(args, host, masks, variant, inline))
      if not inline:
        runners[-1].peak = _torch_memory_alone(args, variant)
  if args.impl in ("jax", "both"):
    fusions = [f.strip() for f in args.cpu_library_fusion.split(",")]
    schedulers = [f.strip() for f in args.cpu_scheduler.split(",")]
    variants = [(impl.strip(), None, fusion, norm_impl.strip(), scheduler)
                for impl in args.conv_impl.split(",") for fusion in fusions
                for norm_impl in args.norm_impl.split(",")
                for scheduler in schedulers]
    for opts in json.loads(args.xla_options or "[]"):
      variants.append(variants[0][:1] + (opts,) + variants[0][2:])
    for impl in dict.fromkeys(v[0] for v in variants):
      why = conv_impl_that_runs(impl, args.dtype)[1]
      if why:
        print(f"note: {why}; named and timed as gemm", file=sys.stderr)
    variants = _once(variants, lambda v: jax_variant_name(
        v[0], v[3], v[2], v[1], v[4], args.dtype))
    for impl, opts, fusion, norm_impl, scheduler in variants:
      runners.append(JaxStep(args, host, masks, impl, opts, fusion,
                             norm_impl, scheduler))
      runners[-1].run()  # first call of the compiled executable
  for _ in range(args.warmup):
    for r in runners:
      r.run()
  times = {r.name: [] for r in runners}
  cpu_times = {r.name: [] for r in runners}
  for i in range(args.steps):
    order = runners if i % 2 == 0 else runners[::-1]
    for r in order:
      t0, c0 = time.perf_counter(), time.process_time()
      r.run()
      times[r.name].append(time.perf_counter() - t0)
      cpu_times[r.name].append(time.process_time() - c0)
  # Before the peak-FLOPs matmul, whose buffers would count.
  device_peak = next((r.process_device_peak() for r in runners
                      if hasattr(r, "process_device_peak")), None)
  n = args.matmul_size or (8192 if any(
      "cuda" in r.device_name() or "gpu" in r.device_name()
      for r in runners) else 2048)
  peaks = {r.name: r.matmul_flops_per_s(n, args.dtype) for r in runners}
  peak = max(peaks.values())
  flops = 2 * macs * args.batch * 4
  load = os.getloadavg()
  lines = []
  for r in runners:
    sec = _median(times[r.name])
    mem, mem_src = r.memory()
    line = {
        "impl": r.name, "model": args.model, "batch": args.batch,
        "size": args.size, "dtype": args.dtype, "device": r.device_name(),
        "devices": getattr(r, "devices", 1),
        "ms_per_step": round(sec * 1e3, 2),
        "cpu_ms_per_step": round(_median(cpu_times[r.name]) * 1e3, 2),
        "images_per_s": round(args.batch / sec, 2),
        "compile_s": round(r.compile_s, 2),
        "peak_memory_bytes": mem, "peak_memory_source": mem_src,
        "flops_per_step": flops,
        "achieved_tflops": round(flops / sec / 1e12, 4),
        "matmul_peak_tflops": round(peak / 1e12, 4),
        "own_matmul_tflops": round(peaks[r.name] / 1e12, 4),
        "fraction_of_peak": round(flops / sec / peak, 4),
        "steps": args.steps, "warmup": args.warmup,
        "step_times_ms": [round(t * 1e3, 1) for t in times[r.name]],
        "loadavg": [round(x, 2) for x in load], "cpus": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "host_malloc": args.host_malloc,
    }
    if r.name.startswith("torch"):
      line["torch_threads"] = r.torch.get_num_threads()
    elif device_peak is not None:  # all JAX variants of the run together
      line["process_device_peak_bytes"] = device_peak
    lines.append(line)
  lines.extend(ratio_lines(lines))
  for l in lines:
    text = json.dumps(l)
    print(text, flush=True)
    if out:
      out.write(text + "\n")
  if out:
    out.close()
  return lines


def ratio_lines(lines):
  """JAX/PyTorch throughput (and CPU-time) ratios against the FASTEST
  PyTorch variant of the run, one line per JAX variant."""
  torch_rows = [l for l in lines if l["impl"].startswith("torch")]
  if not torch_rows:
    return []
  best = max(torch_rows, key=lambda l: l["images_per_s"])
  out = []
  for l in lines:
    if l["impl"].startswith("jax"):
      out.append({
          "ratio": f"{l['impl']}/{best['impl']}", "vs": best["impl"],
          "fastest_torch": best["impl"], "model": l["model"],
          "batch": l["batch"], "size": l["size"], "dtype": l["dtype"],
          "throughput_ratio": round(l["images_per_s"] / best["images_per_s"],
                                    3),
          "cpu_time_ratio": round(best["cpu_ms_per_step"]
                                  / l["cpu_ms_per_step"], 3),
          "per_torch_variant": {
              t["impl"]: round(l["images_per_s"] / t["images_per_s"], 3)
              for t in torch_rows}})
      paired = paired_ratio(best.get("step_times_ms"),
                            l.get("step_times_ms"))
      if paired:
        out[-1]["paired_ratio"] = paired
  return out


def _quantile(sorted_xs, q):
  """Linear-interpolated quantile of a sorted, non-empty list."""
  pos = q * (len(sorted_xs) - 1)
  lo = int(pos)
  hi = min(lo + 1, len(sorted_xs) - 1)
  return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def paired_ratio(torch_ms, jax_ms):
  """The throughput ratio round by round: PyTorch's step time over JAX's
  step time of the same round (the two ran back to back, so a slow minute
  of a shared machine hits both), as median and quartiles over the rounds.
  Their spread says how far a run's ratio can be trusted: two variants
  whose quartile ranges overlap are not told apart by this run. None when
  the two lists are missing or of different lengths."""
  if not torch_ms or not jax_ms or len(torch_ms) != len(jax_ms):
    return None
  ratios = sorted(t / j for t, j in zip(torch_ms, jax_ms) if j > 0)
  if not ratios:
    return None
  return {"median": round(_quantile(ratios, 0.5), 3),
          "q1": round(_quantile(ratios, 0.25), 3),
          "q3": round(_quantile(ratios, 0.75), 3),
          "min": round(ratios[0], 3), "max": round(ratios[-1], 3),
          "rounds": len(ratios)}


def _memory_probe(args):
  """The child of ``--torch_memory process``: builds the one PyTorch variant
  of ``--torch_variants`` in this fresh process, runs its first two steps,
  and returns its peak memory (one JSON object)."""
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  from rebll_jax import host_malloc  # pylint: disable=g-import-not-at-top
  host_malloc.configure(args.host_malloc)
  import torch  # pylint: disable=g-import-not-at-top,unused-import
  from experiments.torch_baseline import rebll_step  # pylint: disable=g-import-not-at-top,unused-import
  (variant,) = torch_variants(args)
  host, masks = make_inputs(args.batch, args.size, args.num_classes)
  rss0 = _reset_rss_peak() or _rss_bytes("VmRSS")
  step = TorchStep(args, host, masks, variant, inline_memory=False)
  if step.device == "cuda":
    return {"peak_memory_bytes": torch.cuda.max_memory_allocated(),
            "peak_memory_source": "torch.cuda.max_memory_allocated of this "
                                  "variant alone (a fresh process: build + "
                                  "first two steps)"}
  return {"peak_memory_bytes": _rss_bytes("VmHWM") - rss0,
          "peak_memory_source": "peak resident memory of this variant alone "
                                "(a fresh process, above its resident "
                                "memory after importing torch: build + "
                                "first two steps; CPU)"}


def _torch_memory_alone(args, variant):
  """(bytes, source) of one PyTorch variant measured alone in a child
  process (``--memory_probe``); (None, why) when the child fails."""
  import subprocess  # pylint: disable=g-import-not-at-top
  cmd = [sys.executable, os.path.abspath(__file__), "--memory_probe",
         "--impl", "torch", "--torch_variants", variant,
         "--model", args.model, "--batch", str(args.batch),
         "--size", str(args.size), "--dtype", args.dtype,
         "--num_classes", str(args.num_classes),
         "--host_malloc", args.host_malloc]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                        cwd=ROOT)
  try:
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    return line["peak_memory_bytes"], line["peak_memory_source"]
  except (IndexError, ValueError, KeyError):
    why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"unavailable: the memory child exited {proc.returncode}: {why}"


def _check_xla_options(options):
  """Each ``--xla_options`` dict compiles a trivial program, so an option
  this XLA does not know is a usage error before any model is built."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  for opts in options:
    try:
      jax.jit(lambda x: x + 1).lower(jnp.ones(2)).compile(
          compiler_options=opts)
    except jax.errors.JaxRuntimeError as e:
      _usage_error(f"--xla_options {opts}: {' '.join(str(e).split())}")


def _macs_only(args):
  """MACs per image of one eval forward of ``--model`` at ``--size``,
  counted on the traced Flax model (nothing compiled); ValueError where the
  model does not take the size."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from experiments.model_stats import count_macs  # pylint: disable=g-import-not-at-top
  from rebll_jax import config_base, models  # pylint: disable=g-import-not-at-top
  c = config_base.base_config()
  model_config(c, args.model)
  model = models.build_model(c.model, args.num_classes)
  x = jax.ShapeDtypeStruct((1, args.size, args.size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                jnp.zeros(x.shape)))
  apply = lambda v, x: model.apply(v, x, train=False)
  return count_macs(jax.make_jaxpr(apply)(variables, x).jaxpr)


if __name__ == "__main__":
  main()
