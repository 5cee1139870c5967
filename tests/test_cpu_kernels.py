"""rebll_jax.models.cpu_kernels: our C++ convolution kernels behind XLA's FFI.

The forward and filter-gradient kernels against ``lax.conv_general_dilated``
and its VJP for every register-block path (16 / 32 / 64-multiple output
channels, input channels that are and are not multiples of the block, rows
narrower than a block, k = 1, 3, 5, asymmetric padding, stride 1 and 2),
``conv_impl=kernel`` values and both gradients (strided input gradients as
kernel phases, stride 3 left to XLA), with 1 and several
threads (uneven batch splits); ``conv_impl=kernel`` inside a whole model's
gradient; the batch-sharded partitioning on two CPU devices (sharded
forward, summed filter gradient, no all-gather); the build cache; the
AVX2 build (8-float vectors: equal to XLA, and bit for bit to the native
build); and what a machine without a compiler, or without AVX-512 and
AVX2 + FMA, gets (``auto`` keeps XLA's convolutions, an explicit
``kernel`` is a one-line config error).
"""

import json
import os
import platform
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rebll_jax import config_base, validate
from rebll_jax.errors import UserError
from rebll_jax.models import build_model, conv, cpu_kernels
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The machine's own build (the fallback without a compiler is tested below).
needs_kernels = pytest.mark.skipif(
    not cpu_kernels.available(),
    reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


def _xla(x, w, padding, stride=1):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                      dimension_numbers=("NHWC", "HWIO",
                                                         "NHWC"))


CASES = [  # (n, h, w, cin, cout, k, padding)
    (2, 9, 10, 16, 16, 3, ((1, 1), (1, 1))),  # PB 16 path, tail blocks
    (3, 7, 5, 48, 32, 3, ((1, 1), (1, 1))),  # COV 2, runtime cin
    (2, 6, 6, 64, 64, 3, ((1, 1), (1, 1))),  # COV 4, cin 64 template
    (2, 5, 3, 3, 48, 3, ((1, 1), (1, 1))),  # RGB-like cin 3, co 48
    (1, 8, 9, 8, 16, 5, ((2, 1), (0, 2))),  # k 5, asymmetric padding
    (2, 4, 4, 20, 16, 1, ((0, 0), (0, 0))),  # 1x1
    (5, 6, 6, 32, 16, 3, ((1, 1), (1, 1))),  # 5 images over 3 threads
    (2, 6, 14, 64, 64, 3, ((1, 1), (1, 1))),  # rows of 14: 7-position blocks
    (2, 5, 7, 128, 64, 3, ((1, 1), (1, 1))),  # 2 chunks of 64 input channels
    (2, 4, 9, 80, 64, 3, ((0, 2), (1, 0))),  # chunks of 64 + 16, rows of 9
]


@needs_kernels
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("n,h,w,cin,cout,k,padding", CASES)
def test_kernels_equal_xla(n, h, w, cin, cout, k, padding, threads):
  rng = np.random.default_rng(n * 100 + cin)
  x = rng.standard_normal((n, h, w, cin), np.float32)
  wt = rng.standard_normal((k, k, cin, cout), np.float32)
  y_ref, vjp = jax.vjp(lambda w_: _xla(x, w_, padding), wt)
  g = rng.standard_normal(y_ref.shape, np.float32)
  (dw_ref,) = vjp(g)

  @jax.jit
  def ours(x, wt, g):
    return (cpu_kernels.conv_forward(x, wt, padding, threads),
            cpu_kernels.filter_grad(x, g, (k, k), padding, threads))

  y, dw = ours(x, wt, g)
  assert y.shape == y_ref.shape and dw.shape == wt.shape
  assert _rel(y, y_ref) < 1e-5
  assert _rel(dw, dw_ref) < 1e-5


STRIDED_CASES = [  # (n, h, w, cin, cout, k, padding, stride)
    (2, 30, 30, 3, 64, 7, ((3, 3), (3, 3)), 2),  # a 7x7 RGB stem: taps 21
    (2, 11, 10, 2, 32, 5, ((2, 2), (2, 2)), 1),  # taps 10: blocks of 2
    (3, 9, 9, 1, 16, 3, ((1, 0), (0, 1)), 2),  # one channel, asymmetric
    # 40 x 40 x (64 + 64) floats are 800 KB, over the 256 KB pass chunk:
    # chunks of output rows that straddle images.
    (3, 40, 40, 64, 64, 3, ((1, 1), (1, 1)), 1),
    (3, 41, 40, 64, 32, 3, ((1, 1), (1, 1)), 2),
]


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,h,w,cin,cout,k,padding,stride", STRIDED_CASES)
def test_small_cin_and_row_chunks_equal_xla(n, h, w, cin, cout, k, padding,
                                            stride, threads):
  rng = np.random.default_rng(h * 10 + cin)
  x = rng.standard_normal((n, h, w, cin), np.float32)
  wt = rng.standard_normal((k, k, cin, cout), np.float32)
  y_ref, vjp = jax.vjp(lambda w_: _xla(x, w_, padding, stride), wt)
  g = rng.standard_normal(y_ref.shape, np.float32)
  (dw_ref,) = vjp(g)

  @jax.jit
  def ours(x, wt, g):
    return (cpu_kernels.conv_forward(x, wt, padding, threads, stride),
            cpu_kernels.filter_grad(x, g, (k, k), padding, threads, stride))

  y, dw = ours(x, wt, g)
  assert _rel(y, y_ref) < 1e-5
  assert _rel(dw, dw_ref) < 1e-5


@needs_kernels
def test_forward_pads_inside_the_kernel():
  """No XLA pad before the forward call: the kernel pads each image in its
  own buffer (a pad there was a copy of the batch, fused with the input's
  producer, which then ran twice)."""
  x = jnp.ones((2, 6, 6, 16), jnp.float32)
  w = jnp.ones((3, 3, 16, 16), jnp.float32)
  text = jax.jit(lambda x, w: cpu_kernels.conv_forward(
      x, w, ((1, 1), (1, 1)))).lower(x, w).as_text()
  assert "rebll_conv_forward" in text
  assert "pad" not in text.replace("pad_", "")
  # Every output position of an all-ones 3x3 sees 16 * (taps inside).
  y = np.asarray(cpu_kernels.conv_forward(x, w, ((1, 1), (1, 1))))
  assert y[0, 0, 0, 0] == 16 * 4 and y[0, 2, 2, 0] == 16 * 9
  assert y[0, 0, 3, 0] == 16 * 6 and y[1, 5, 5, 15] == 16 * 4


def _kernel_equals_xla(x, w, strides, padding=((0, 0), (0, 0))):
  """conv2d's value and both gradients under "kernel" equal "xla"'s; the
  text of the "kernel" program (which FFI calls it makes)."""
  def program(impl):
    return jax.jit(jax.value_and_grad(
        lambda x, w: jnp.sum(conv.conv2d(x, w, strides=strides,
                                         padding=padding, impl=impl) ** 2),
        (0, 1)))
  (v0, (dx0, dw0)), (v1, (dx1, dw1)) = program("xla")(x, w), program(
      "kernel")(x, w)
  assert _rel(v1, v0) < 1e-5
  assert _rel(dx1, dx0) < 1e-5 and _rel(dw1, dw0) < 1e-5
  return program("kernel").lower(x, w).as_text()


@needs_kernels
def test_kernel_impl_values_and_grads_and_routing():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 9, 9, 16), np.float32)
  same = ((1, 1), (1, 1))
  for strides, cout, padding in (
      ((1, 1), 32, same), ((2, 2), 32, same), ((2, 2), 16, same),
      ((3, 3), 32, same), ((1, 1), 24, same),
      ((1, 1), 16, ((3, 3), (0, 3)))):  # dx would need a crop: XLA's
    w = rng.standard_normal((3, 3, 16, cout), np.float32)
    _kernel_equals_xla(x, w, strides, padding)
  # An RGB stem: on the kernels (not im2col) for its forward and filter
  # gradient; its input gradient (phases on XLA) still right.
  hlo = _kernel_equals_xla(rng.standard_normal((2, 16, 16, 3), np.float32),
                           rng.standard_normal((7, 7, 3, 64), np.float32),
                           (2, 2), ((3, 3), (3, 3)))
  assert hlo.count("rebll_conv_forward") >= 1
  assert hlo.count("rebll_conv_filter_grad") == 1  # im2col has neither
  # 1x1 convolutions: their filter gradient on the kernel on large maps
  # with few output channels (conv.KERNEL_1X1_DW_*), else a GEMM.
  for shape, cout, stride, on_kernel in (
      ((2, 14, 15, 48), 32, 1, True), ((2, 28, 28, 16), 64, 2, True),
      ((2, 7, 7, 48), 32, 1, False), ((2, 14, 14, 16), 512, 1, False)):
    hlo = _kernel_equals_xla(
        rng.standard_normal(shape, np.float32),
        rng.standard_normal((1, 1, shape[3], cout), np.float32),
        (stride, stride))
    assert ("rebll_conv_filter_grad" in hlo) == on_kernel, shape
  # Which passes qualify: stride 1 or 2, float32, channels as the kernels
  # need.
  s = cpu_kernels.supports
  assert s((2, 8, 8, 16), (3, 3, 16, 32), (1, 1), jnp.float32) == {
      "forward": True, "filter_grad": True, "input_grad": True}
  assert all(s((2, 8, 8, 16), (3, 3, 16, 32), (2, 2),
               jnp.float32).values())  # dx as stride-1 phases
  assert not any(s((2, 8, 8, 16), (3, 3, 16, 32), (3, 3),
                   jnp.float32).values())
  assert not any(s((2, 8, 8, 16), (3, 3, 16, 32), (1, 1),
                   jnp.bfloat16).values())
  assert s((2, 8, 8, 3), (3, 3, 3, 16), (1, 1), jnp.float32)[
      "input_grad"] is False  # dx has 3 output channels
  assert not any(s((2, 8, 8, 128), (3, 3, 128, 128), (1, 1),
                   jnp.float32).values())  # wide: XLA's GEMMs win


@needs_kernels
def test_model_gradient_kernel_equals_xla():
  cfg = config_base.base_config().model
  cfg.width, cfg.stage_sizes = 16, (1, 1)
  x = np.random.default_rng(0).uniform(size=(4, 12, 12, 3)).astype(
      np.float32)
  grads = {}
  for impl in ("xla", "kernel"):
    cfg.conv_impl = impl
    model = build_model(cfg, 5)
    variables = jax.jit(model.init)(jax.random.key(1), x)

    def loss(params, model=model, variables=variables):
      out, _ = model.apply({**variables, "params": params}, x, train=True,
                           mutable=["batch_stats"])
      return jnp.sum(out["logits"] ** 2) + jnp.sum(out["features"])
    grads[impl] = jax.jit(jax.grad(loss))(variables["params"])
  for a, b in zip(jax.tree.leaves(grads["kernel"]),
                  jax.tree.leaves(grads["xla"])):
    assert _rel(a, b) < 1e-4
  assert conv.resolve_impl("auto") == "kernel"


_SHARDED = r"""
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from rebll_jax.models import cpu_kernels
mesh = Mesh(np.array(jax.devices()), ("data",))
rng = np.random.default_rng(0)
x = rng.standard_normal((4, 6, 6, 16), np.float32)
w = rng.standard_normal((3, 3, 16, 32), np.float32)
g = rng.standard_normal((4, 6, 6, 32), np.float32)
pad = ((1, 1), (1, 1))
conv = lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
y_ref = conv(x, w)
dw_ref = jax.vjp(lambda w: conv(x, w), w)[1](g)[0]
shard = NamedSharding(mesh, P("data"))
f = jax.jit(lambda x, w, g: (cpu_kernels.conv_forward(x, w, pad),
                             cpu_kernels.filter_grad(x, g, (3, 3), pad)))
args = (jax.device_put(x, shard), w, jax.device_put(g, shard))
y, dw = f(*args)
hlo = f.lower(*args).compile().as_text()
rel = lambda a, b: float(abs(np.asarray(a) - b).max() / abs(b).max())
print(json.dumps({"y": rel(y, y_ref), "dw": rel(dw, dw_ref),
                  "y_spec": str(y.sharding.spec), "dw_spec": str(dw.sharding.spec),
                  "all_gather": "all-gather" in hlo, "all_reduce": "all-reduce" in hlo}))
"""


@needs_kernels
def test_batch_sharded_on_two_devices():
  out = subprocess.run([sys.executable, "-c", _SHARDED], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["y"] < 1e-5 and r["dw"] < 1e-5
  assert "data" in r["y_spec"] and "data" not in r["dw_spec"]
  assert r["all_reduce"] and not r["all_gather"]


@needs_kernels
def test_build_is_cached():
  path = cpu_kernels.build()
  mtime = os.stat(path).st_mtime_ns
  assert cpu_kernels.build() == path
  assert os.stat(path).st_mtime_ns == mtime


_DAMAGED = r"""
import json
from rebll_jax.models import cpu_kernels
path = cpu_kernels.build()
with open(path, "wb") as f:
  f.write(b"not a shared library")
print(json.dumps({"available": cpu_kernels.available(),
                  "reason": cpu_kernels.unavailable_reason()}))
"""


@needs_kernels
def test_a_damaged_cache_entry_is_rebuilt(tmp_path):
  # A cache holding this machine's entry (so that only the rebuild compiles).
  built = cpu_kernels.build()
  cache = tmp_path / "rebll_jax" / "kernels"
  cache.mkdir(parents=True)
  shutil.copy(built, cache / os.path.basename(built))
  env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
  out = subprocess.run([sys.executable, "-c", _DAMAGED], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300,
                       check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  # Loadable again: the damaged file was replaced by a fresh build.
  assert json.loads(out.stdout.strip().splitlines()[-1]) == {
      "available": True, "reason": ""}


_NO_COMPILER = r"""
import json, sys
from rebll_jax import config_base, validate
from rebll_jax.errors import UserError
from rebll_jax.models import conv, cpu_kernels
if len(sys.argv) > 1:  # the CPU's feature flags, as /proc/cpuinfo gives them
  cpu_kernels._cpu_flags = lambda: sys.argv[1]
c = config_base.base_config()
c.model.conv_impl = "kernel"
try:
  validate.check_conv_kernels(c)
  error = ""
except UserError as e:
  error = str(e)
print(json.dumps({"available": cpu_kernels.available(),
                  "reason": cpu_kernels.unavailable_reason(),
                  "auto": conv.resolve_impl("auto"), "error": error}))
"""


def test_without_a_compiler_auto_keeps_xla_and_kernel_is_refused(tmp_path):
  env = {**os.environ, "CXX": "no-such-compiler-rebll",
         "XDG_CACHE_HOME": str(tmp_path)}
  out = subprocess.run([sys.executable, "-c", _NO_COMPILER], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300,
                       check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["available"] is False
  assert "no-such-compiler-rebll" in r["reason"]
  assert r["auto"] == "gemm"
  assert r["error"].startswith("model.conv_impl=kernel: the CPU kernels "
                               "cannot be used here (no C++ compiler")
  assert "unavailable" in out.stderr  # the one warning line


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="the vector-unit gate is an x86-64 check")
def test_without_avx512_or_avx2_auto_keeps_xla_and_kernel_is_refused(
    tmp_path):
  """The kernels are written for AVX-512 and AVX2 + FMA: a CPU with
  neither keeps XLA's convolutions, and the compiler is never run."""
  env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
  out = subprocess.run(
      [sys.executable, "-c", _NO_COMPILER,
       "flags\t\t: fpu sse sse2 sse4_2 avx"], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["available"] is False and "neither AVX-512" in r["reason"]
  assert r["auto"] == "gemm"
  assert "neither AVX-512" in r["error"]
  assert "model.conv_impl=auto" in r["error"]
  assert "unavailable" in out.stderr
  assert not os.path.exists(os.path.join(tmp_path, "rebll_jax"))  # no build


@pytest.mark.parametrize("flags,ok", [
    ("fpu sse2 avx avx2 fma", True),  # AVX2 + FMA (Zen 2/3, Haswell on)
    ("fpu sse2 avx avx2 fma avx512f avx512bw", True),
    ("fpu sse2 avx avx2", False),  # no FMA
    ("fpu sse2 avx", False)])
def test_vector_unit_gate(monkeypatch, flags, ok):
  monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: "flags : " + flags)
  monkeypatch.setattr(platform, "machine", lambda: "x86_64")
  cpu_kernels.vector_isa_problem.cache_clear()
  try:
    assert (cpu_kernels.vector_isa_problem() == "") is ok
  finally:
    cpu_kernels.vector_isa_problem.cache_clear()


_AVX2_BUILD = """
import sys
import numpy as np
from rebll_jax.models import cpu_kernels
cpu_kernels.CXX_FLAGS = tuple("-march=x86-64-v3" if f == "-march=native"
                              else f for f in cpu_kernels.CXX_FLAGS)
from tests.test_cpu_kernels import AVX2_CASES, run_case
out = {}
for i, case in enumerate(AVX2_CASES):
  out[f"y{i}"], out[f"dw{i}"] = run_case(case)
np.savez(sys.argv[1], **out)
"""

# CASES plus a stride-2 RGB stem and 24 input channels (AVX2's 6-row
# filter-gradient blocks): (n, h, w, cin, cout, k, padding, stride).
AVX2_CASES = [c + (1,) for c in CASES] + [
    (2, 12, 12, 3, 64, 7, ((3, 3), (3, 3)), 2),
    (2, 8, 8, 24, 32, 3, ((1, 1), (1, 1)), 1),
    (2, 8, 8, 64, 64, 3, ((1, 1), (1, 1)), 2)]


def _case_inputs(case):
  """Seeded x, filter and output cotangent of an AVX2_CASES entry."""
  n, h, w, cin, cout, k, ((pt, pb), (pl, pr)), stride = case
  rng = np.random.default_rng(n * 100 + cin + k)
  x = rng.standard_normal((n, h, w, cin), np.float32)
  wt = rng.standard_normal((k, k, cin, cout), np.float32)
  out = (n, (h + pt + pb - k) // stride + 1, (w + pl + pr - k) // stride + 1,
         cout)
  return x, wt, rng.standard_normal(out, np.float32)


def run_case(case):
  """Kernel forward and filter gradient of one AVX2_CASES entry."""
  k, padding, stride = case[5], case[6], case[7]
  x, wt, g = _case_inputs(case)
  y = jax.jit(lambda x, wt: cpu_kernels.conv_forward(x, wt, padding, 2,
                                                     stride))(x, wt)
  dw = jax.jit(lambda x, g: cpu_kernels.filter_grad(x, g, (k, k), padding, 2,
                                                    stride))(x, g)
  return np.asarray(y), np.asarray(dw)


@needs_kernels
@pytest.mark.skipif(
    not {"avx2", "fma"} <= set(cpu_kernels._cpu_flags().split()),
    reason="AVX2 code needs a CPU with AVX2 and FMA to run")
def test_avx2_build_equals_xla_and_the_native_build(tmp_path):
  """The kernels compiled for AVX2 (``-march=x86-64-v3``: 8-float vectors,
  smaller register blocks) compute what XLA does, and bit for bit what the
  machine's own build does (the summation order of every output does not
  depend on the register blocks)."""
  cxx = os.environ.get("CXX", "g++")
  macros = subprocess.run([cxx, "-march=x86-64-v3", "-dM", "-E", "-x", "c++",
                           os.devnull], capture_output=True, text=True,
                          check=True).stdout
  assert "__AVX2__" in macros and "__AVX512F__" not in macros
  env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
  out = subprocess.run(
      [sys.executable, "-c", _AVX2_BUILD, str(tmp_path / "avx2.npz")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  avx2 = np.load(tmp_path / "avx2.npz")
  for i, case in enumerate(AVX2_CASES):
    y, dw = run_case(case)
    np.testing.assert_array_equal(avx2[f"y{i}"], y)
    np.testing.assert_array_equal(avx2[f"dw{i}"], dw)
    x, wt, g = _case_inputs(case)
    padding, stride = case[6], case[7]
    y_ref, vjp = jax.vjp(lambda w_: _xla(x, w_, padding, stride), wt)
    (dw_ref,) = vjp(g)
    assert _rel(avx2[f"y{i}"], y_ref) < 1e-5
    assert _rel(avx2[f"dw{i}"], dw_ref) < 1e-5


def test_unknown_impl_still_rejected():
  with pytest.raises(UserError, match="unknown model.conv_impl 'fast'"):
    c = config_base.base_config()
    c.model.conv_impl = "fast"
    validate.check_config(c)


@needs_kernels
def test_macs_counted_through_the_kernels():
  """experiments/model_stats.count_macs (the benchmark's FLOPs) sees our
  kernels' convolutions: a model's forward counts the same as with XLA's,
  and a filter gradient counts dw's size x the positions it sums over."""
  sys.path.insert(0, ROOT)
  from experiments.model_stats import count_macs  # pylint: disable=g-import-not-at-top
  cfg = config_base.base_config().model
  cfg.width, cfg.stage_sizes = 16, (1, 1)
  x = jnp.zeros((2, 12, 12, 3))
  counts = {}
  for impl, (model, variables) in helpers.models_per_conv_impl(
      cfg, ("xla", "kernel"), 5, x).items():
    counts[impl] = count_macs(
        jax.make_jaxpr(lambda v, m=model: m.apply(v, x))(variables).jaxpr)
  assert counts["kernel"] == counts["xla"] > 0
  xg = jnp.zeros((2, 6, 7, 16))
  jaxpr = jax.make_jaxpr(lambda x, g: cpu_kernels.filter_grad(
      x, g, (3, 3), ((1, 1), (1, 1))))(xg, jnp.zeros((2, 6, 7, 32))).jaxpr
  assert count_macs(jaxpr) == (3 * 3 * 16 * 32) * (2 * 6 * 7)


@pytest.mark.parametrize("value", ["abc", "0", "-2"])
def test_a_bad_thread_count_is_a_user_error(value, monkeypatch):
  monkeypatch.setenv(cpu_kernels.THREADS_ENV, value)
  with pytest.raises(UserError, match=r"REBLL_CPU_KERNEL_THREADS must be a "
                     r"positive integer .*; unset it for the default"):
    validate.check_conv_kernels(config_base.base_config())
