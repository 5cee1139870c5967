"""Every convolution of a backbone, timed alone: XLA vs PyTorch (oneDNN).

  python experiments/bench_conv_shapes.py --model small_resnet --batch 32 \
      --size 64 --threads 1

Where does a train step's convolution time go, and is XLA's kernel the
slower one? The script traces the model's forward (``conv_impl=xla``, so
every convolution is one ``lax.conv_general_dilated``), collects the
distinct convolution shapes, and times each one's three passes: forward,
input gradient (dx) and filter gradient (dw). XLA runs ``jax.jit`` of the
convolution and its VJPs; PyTorch runs ``conv2d`` and
``aten.convolution_backward`` on channels-last tensors. One JSON line per
shape (median ms of ``--reps`` calls, and how often the model uses it),
then one line of totals, weighted by use.

XLA's programs compile with ``--cpu_library_fusion`` (default
``reductions``, as a run compiles them: convolutions on Eigen;
``xla_default`` puts them in YNNPACK).

``--kernel`` adds each convolution as the model runs it with
``model.conv_impl=kernel`` (our C++ kernels for the passes whose shapes
they take, XLA's elsewhere; ``rebll_jax/models/cpu_kernels.py``), checked
against XLA's forward.

``--dw_forms`` adds, per stride-1 k x k convolution, the filter gradient
written as GEMMs (one im2col GEMM; k*k shifted-view GEMMs), timed the same
way and checked against XLA's gradient: the formulations a custom VJP could
route to (``rebll_jax/models/conv.py``).

``--threads 1`` (the default) is the regime of the default experiment: its
two XLA CPU devices each get one core (``--xla_cpu_multi_thread_eigen=false``
here, ``torch.set_num_threads(1)``) and a batch of 32. ``--threads 0``
leaves both libraries their default thread pools. The passes of the train
step this does not show (our ``conv_impl=gemm`` rewrites of some filter
gradients, fusions around the convolutions) are ``benchmark_step.py``'s.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from experiments import cli_checks  # pylint: disable=g-import-not-at-top
# xla_cpu imports JAX only inside its functions: XLA_FLAGS can still be set.
from rebll_jax import xla_cpu  # pylint: disable=g-import-not-at-top
from experiments.benchmark_step import MODELS, model_config  # pylint: disable=g-import-not-at-top


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", choices=MODELS, default="small_resnet")
  p.add_argument("--batch", type=cli_checks.positive_int, default=32,
                 help="images per call (the default experiment: 32 per "
                 "device)")
  p.add_argument("--size", type=cli_checks.positive_int, default=64)
  p.add_argument("--threads", type=int, default=1,
                 help="1: one core each (default); 0: library defaults")
  p.add_argument("--reps", type=cli_checks.positive_int, default=20)
  p.add_argument("--no_torch", action="store_true",
                 help="time XLA only (no PyTorch installed)")
  p.add_argument("--cpu_library_fusion", default="reductions",
                 help="model.cpu_library_fusion of XLA's programs on CPU "
                 "(default: reductions, as a run compiles them; xla_default "
                 "puts convolutions in YNNPACK)")
  p.add_argument("--kernel", action="store_true",
                 help="also time each convolution as the model runs it with "
                 "model.conv_impl=kernel (our C++ kernels where the shape "
                 "allows, rebll_jax/models/cpu_kernels.py), checked against "
                 "XLA's forward")
  p.add_argument("--dw_forms", action="store_true",
                 help="also time the filter gradient of every stride-1 k x k "
                 "convolution written as GEMMs (one im2col GEMM; k*k tap "
                 "GEMMs), checked against XLA's")
  args = p.parse_args(argv)
  if args.cpu_library_fusion not in xla_cpu.CPU_LIBRARY_FUSIONS:
    p.error(f"--cpu_library_fusion must be one of "
            f"{list(xla_cpu.CPU_LIBRARY_FUSIONS)}, got "
            f"{args.cpu_library_fusion!r}")
  if args.threads not in (0, 1):
    p.error(f"--threads must be 0 or 1, got {args.threads}")
  return args


def conv_shapes(model_name: str, batch: int, size: int) -> list:
  """[(shape dict, uses)] of the forward's convolutions, first use first."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from rebll_jax import config_base, models  # pylint: disable=g-import-not-at-top
  from experiments.model_stats import _sub_jaxprs  # pylint: disable=g-import-not-at-top
  c = config_base.base_config()
  model_config(c, model_name)
  c.model.conv_impl = "xla"
  model = models.build_model(c.model, 20)
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                         train=False))
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(
      variables, x).jaxpr
  uses = collections.OrderedDict()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        params = eqn.params
        if any(d != 1 for d in params["lhs_dilation"] + params["rhs_dilation"]):
          raise SystemExit("error: dilated convolutions are not supported")
        key = json.dumps({
            "input": list(eqn.invars[0].aval.shape),
            "kernel": list(eqn.invars[1].aval.shape),
            "strides": list(params["window_strides"]),
            "padding": [list(p) for p in params["padding"]],
            "groups": params["feature_group_count"]})
        uses[key] = uses.get(key, 0) + 1
      for sub in _sub_jaxprs(eqn):
        walk(sub)

  walk(jaxpr)
  return [(json.loads(k), n) for k, n in uses.items()]


def _rel_diff(out, ref) -> float:
  """max |out - ref| / max |ref| (numpy arrays; 1 where ref is all zero)."""
  return float(abs(out - ref).max()) / (float(abs(ref).max()) or 1.0)


def _median_ms(fn, reps: int) -> float:
  fn()  # compile / warm up
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  times.sort()
  return 1e3 * times[len(times) // 2]


def operands(shape: dict):
  """(x NHWC, w HWIO) float32 numpy, the same for both libraries."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  return (rng.standard_normal(shape["input"], np.float32),
          rng.standard_normal(shape["kernel"], np.float32))


def _conv(shape: dict, impl: str = "lax"):
  """(x NHWC, w HWIO) -> the shape's convolution: ``lax``, one
  ``lax.conv_general_dilated`` as XLA runs it; else the model's
  ``conv2d(impl=...)`` route (ungrouped shapes)."""
  import jax  # pylint: disable=g-import-not-at-top
  from rebll_jax.models import conv as conv_lib  # pylint: disable=g-import-not-at-top
  if impl != "lax":
    return lambda x, w: conv_lib.conv2d(
        x, w, strides=shape["strides"],
        padding=[tuple(p) for p in shape["padding"]], impl=impl)

  def conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, shape["strides"], [tuple(p) for p in shape["padding"]],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=shape["groups"])
  return conv


def time_xla(shape: dict, reps: int, options: dict | None = None,
             impl: str = "lax") -> tuple[dict, object]:
  """({pass: ms}, forward output as numpy NHWC); ``options``: XLA compiler
  options of every program; ``impl``: see ``_conv``."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  x, w = (jax.numpy.asarray(a) for a in operands(shape))
  conv = _conv(shape, impl)
  g = jax.numpy.ones_like(conv(x, w))
  jit = functools.partial(jax.jit, compiler_options=options)
  fwd = jit(conv)
  dx = jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
  dw = jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
  return {
      "fwd": _median_ms(lambda: fwd(x, w).block_until_ready(), reps),
      "dx": _median_ms(lambda: dx(x, w, g).block_until_ready(), reps),
      "dw": _median_ms(lambda: dw(x, w, g).block_until_ready(), reps)
  }, np.asarray(fwd(x, w))


def _dw_gemm_forms(shape: dict, options: dict | None = None) -> dict:
  """{name: jitted (x, g) -> dW} for a stride-1, ungrouped k x k convolution:
  the filter gradient as one im2col GEMM ([P, k*k*cin]^T [P, cout] over the
  P output positions) and as k*k tap GEMMs (one per shifted input view)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  kh, kw, cin, _ = shape["kernel"]

  def views(x, g):
    xp = jnp.pad(x, [(0, 0), *map(tuple, shape["padding"]), (0, 0)])
    ho, wo = g.shape[1:3]
    return [xp[:, i:i + ho, j:j + wo] for i in range(kh) for j in range(kw)]

  def flat(a):
    return a.reshape(-1, a.shape[-1])

  def im2col(x, g):
    cols = jnp.concatenate(views(x, g), axis=-1)
    return (flat(cols).T @ flat(g)).reshape(kh, kw, cin, -1)

  def taps(x, g):
    return jnp.stack([flat(v).T @ flat(g) for v in views(x, g)]).reshape(
        kh, kw, cin, -1)

  jit = functools.partial(jax.jit, compiler_options=options)
  return {"im2col": jit(im2col), "taps": jit(taps)}


def time_dw_forms(shape: dict, reps: int,
                  options: dict | None = None) -> dict:
  """{form: ms} of ``_dw_gemm_forms`` ({} where they do not apply); exits 1
  if a form computes another gradient than XLA's."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  kh, kw = shape["kernel"][:2]
  if shape["strides"] != [1, 1] or shape["groups"] != 1 or kh * kw == 1:
    return {}
  x, w = (jax.numpy.asarray(a) for a in operands(shape))
  conv = functools.partial(_conv(shape), x)
  y = jax.eval_shape(conv, w)
  g = jax.numpy.asarray(
      np.random.default_rng(1).standard_normal(y.shape, np.float32))
  xla_dw = jax.jit(lambda w, g: jax.vjp(conv, w)[1](g)[0],
                   compiler_options=options)
  want = np.asarray(xla_dw(w, g))
  times = {}
  for name, form in _dw_gemm_forms(shape, options).items():
    diff = _rel_diff(np.asarray(form(x, g)), want)
    if diff > 1e-4:
      raise SystemExit(f"error: filter gradient as {name} differs from "
                       f"XLA's (relative {diff:.2e}) for {shape}")
    times[name] = round(_median_ms(
        lambda f=form: f(x, g).block_until_ready(), reps), 3)
  return times


def time_torch(shape: dict, reps: int) -> tuple[dict, object]:
  """({pass: ms}, forward output as numpy NHWC); ({}, None) when PyTorch
  has no single call for the shape (asymmetric padding)."""
  import torch  # pylint: disable=g-import-not-at-top
  (pt, pb), (pl, pr) = shape["padding"]
  if pt != pb or pl != pr:
    return {}, None
  x, w = operands(shape)
  cl = torch.channels_last
  x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=cl)
  w = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=cl)
  stride, padding, groups = shape["strides"], [pt, pl], shape["groups"]
  with torch.no_grad():
    y = torch.nn.functional.conv2d(x, w, None, stride, padding, 1, groups)
    g = torch.ones_like(y)

    def backward(mask):
      return lambda: torch.ops.aten.convolution_backward(
          g, x, w, None, stride, padding, [1, 1], False, [0, 0], groups,
          mask)
    return {
        "fwd": _median_ms(lambda: torch.nn.functional.conv2d(
            x, w, None, stride, padding, 1, groups), reps),
        "dx": _median_ms(backward([True, False, False]), reps),
        "dw": _median_ms(backward([False, True, False]), reps)
    }, y.permute(0, 2, 3, 1).numpy()


def main(argv=None):
  args = parse_args(argv)
  if args.threads == 1 and "jax" in sys.modules:
    print("note: JAX was imported before this script: XLA keeps its "
          "thread pool (run the script as its own process)", file=sys.stderr)
  if args.threads == 1:  # before JAX starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false")
    os.environ["REBLL_CPU_KERNEL_THREADS"] = "1"
  if args.kernel:
    from rebll_jax.models import cpu_kernels  # pylint: disable=g-import-not-at-top
    if not cpu_kernels.available():
      raise SystemExit("error: --kernel: the CPU kernels cannot be used here ("
                       f"{cpu_kernels.unavailable_reason()})")
  use_torch = not args.no_torch
  if use_torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise SystemExit("error: PyTorch is not installed; pass --no_torch "
                       "to time XLA only") from None
    if args.threads == 1:
      torch.set_num_threads(1)
  totals, skipped = collections.defaultdict(float), 0
  options = xla_cpu.compiler_options(args.cpu_library_fusion)
  shapes = conv_shapes(args.model, args.batch, args.size)
  for i, (shape, uses) in enumerate(shapes):
    line = {"model": args.model, "conv": i, "uses": uses, **shape}
    line["xla_ms"], xla_out = time_xla(shape, args.reps, options)
    if args.kernel and shape["groups"] == 1:
      line["kernel_ms"], kernel_out = time_xla(shape, args.reps, options,
                                               "kernel")
      diff = _rel_diff(kernel_out, xla_out)
      if diff > 1e-4:
        raise SystemExit(f"error: conv {i}: conv_impl=kernel and XLA "
                         f"forward outputs differ (relative {diff:.2e})")
    if args.dw_forms:
      line["xla_dw_forms_ms"] = time_dw_forms(shape, args.reps, options)
    if use_torch:
      line["torch_ms"], torch_out = time_torch(shape, args.reps)
      if torch_out is not None:
        # The two libraries computed the same convolution (else: exit 1).
        diff = _rel_diff(torch_out, xla_out)
        line["fwd_rel_diff"] = diff
        if diff > 1e-3:
          print(json.dumps(line))
          raise SystemExit(f"error: conv {i}: XLA and PyTorch forward "
                           f"outputs differ (relative {diff:.2e})")
    # Totals only over shapes both libraries ran: comparable sums.
    counted = not use_torch or bool(line["torch_ms"])
    if not counted:
      skipped += uses
    for lib in ("xla_ms", "kernel_ms", "torch_ms"):
      for step, ms in line.get(lib, {}).items():
        line[lib][step] = round(ms, 3)
        if counted:
          totals[f"{lib[:-3]}_{step}_ms"] += uses * ms
    print(json.dumps(line), flush=True)
  print(json.dumps({"model": args.model, "batch": args.batch,
                    "size": args.size, "threads": args.threads or "default",
                    "cpu_library_fusion": args.cpu_library_fusion,
                    "convs": sum(n for _, n in shapes),
                    "distinct": len(shapes), "not_in_totals": skipped,
                    **{k: round(v, 2) for k, v in sorted(totals.items())}}))


if __name__ == "__main__":
  main()
