"""Our own CPU kernels for k x k convolutions, called through XLA's FFI.

XLA:CPU's convolutions (Eigen) are the wall of the default experiment's step:
its 3x3 filter gradients ran at a third of oneDNN's speed, and no rewrite
into XLA's own ops (im2col, tap GEMMs, Winograd) beat them (README,
"Benchmark"). ``cpu_kernels.cc`` holds two direct kernels, register-blocked
over 16-float vectors: the forward convolution at stride 1 or 2 (the input gradient is the forward of
the cotangent with the flipped filter; for a strided convolution, of its
stride-1 phases) and the filter gradient.

The source is compiled on first use with the host's C++ compiler (``$CXX``,
default ``g++``; ``-O3 -march=native``) into a cache keyed by the source,
the compiler, the flags, jaxlib and the CPU's feature flags
(``$XDG_CACHE_HOME/rebll_jax/kernels``, default ``~/.cache``): a few seconds
once, then a file load. The kernels are written for AVX-512 and, with
smaller register blocks, AVX2 + FMA (``kLanes`` in the source; the compiler
picks by ``-march=native``). Where no compiler works, or the CPU has
neither (``vector_isa_problem``), ``available()`` is False and says why;
``conv_impl=auto`` then keeps XLA's convolutions (``gemm``).

Both calls are ``custom_partitioning`` functions, so a batch-sharded jit
(``parallel.data_sharded``) runs them per device on its own shard: the
forward stays sharded, the filter gradient is summed over the batch axes
(one all-reduce, as XLA's own gradient). Each call splits its shard's
images over ``threads_per_device()`` threads (the host's cores over the
local CPU devices: 1 on the default experiment's two devices on two cores;
``$REBLL_CPU_KERNEL_THREADS`` overrides it).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile

import numpy as np

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "cpu_kernels.cc")
CXX_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
             "-w")  # -w: the FFI headers warn under some g++ versions
_TARGETS = {"forward": "RebllConvForward", "filter_grad": "RebllConvFilterGrad"}
# Output channels per vector: the kernels need multiples of it.
CHANNEL_MULTIPLE = 16
# Wider convolutions stay on XLA: there Eigen's blocked GEMMs win.
MAX_CHANNELS = 64
# Input channel counts that are not a multiple of this (RGB stems) take the
# filter gradient's whole-row tap blocks (the input is padded first).
SMALL_CIN_MULTIPLE = 4


def _cache_dir() -> str:
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(root, "rebll_jax", "kernels")


def _cpu_flags() -> str:
  """The CPU's feature flags (-march=native code is only valid on them)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return line
  except OSError:
    pass
  import platform  # pylint: disable=g-import-not-at-top
  return platform.processor() or platform.machine()


def _compiler_version(cxx: str) -> str:
  out = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                       timeout=30, check=True)
  return out.stdout.splitlines()[0] if out.stdout else cxx


def build() -> str:
  """Path of the compiled library (built now unless cached); raises
  RuntimeError with the reason when it cannot be built."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  cxx = os.environ.get("CXX", "g++")
  if shutil.which(cxx) is None:
    raise RuntimeError(f"no C++ compiler {cxx!r} on PATH (set $CXX)")
  try:
    version = _compiler_version(cxx)
  except (OSError, subprocess.SubprocessError) as e:
    raise RuntimeError(f"{cxx} --version failed: {e}") from None
  with open(SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(b"\0".join([
      source, version.encode(), " ".join(CXX_FLAGS).encode(),
      jaxlib.__version__.encode(), _cpu_flags().encode()])).hexdigest()[:16]
  cache = _cache_dir()
  path = os.path.join(cache, f"rebll_cpu_kernels_{key}.so")
  if os.path.exists(path):
    return path
  try:
    os.makedirs(cache, exist_ok=True)
  except OSError as e:
    raise RuntimeError(f"cannot create {cache}: {e.strerror}") from None
  # Compile to a private name, then rename: processes building at once
  # (pytest workers) never load a half-written file.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
  os.close(fd)
  cmd = [cxx, *CXX_FLAGS, "-I", jax.ffi.include_dir(), SOURCE, "-o", tmp]
  # Once per machine and source; said so that the pause is explained.
  log.warning("compiling the CPU convolution kernels once (a few seconds; "
              "cached in %s)", cache)
  try:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  except (OSError, subprocess.SubprocessError) as e:
    os.unlink(tmp)
    raise RuntimeError(f"{cxx} failed: {e}") from None
  if result.returncode != 0:
    os.unlink(tmp)
    last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise RuntimeError(f"{cxx} failed (exit {result.returncode}): {last}")
  os.replace(tmp, path)
  return path


@functools.lru_cache(maxsize=None)
def vector_isa_problem() -> str:
  """Why this CPU should not run the kernels ("" where it should).

  Their register blocks are written for AVX-512 (32 registers of 16
  floats) and, with smaller blocks, for AVX2 with FMA (16 registers of 8
  floats); ``-march=native`` picks the one the CPU has. Without either
  (older x86, other architectures: never measured) XLA's convolutions stay.
  """
  import platform  # pylint: disable=g-import-not-at-top
  machine = platform.machine().lower()
  if machine not in ("x86_64", "amd64"):
    return (f"the kernels are written and measured for x86-64 with AVX-512 "
            f"or AVX2; this CPU is {machine or 'unknown'}")
  flags = set(_cpu_flags().split())
  if "avx512f" in flags or {"avx2", "fma"} <= flags:
    return ""
  return ("this CPU has neither AVX-512 (avx512f) nor AVX2 with FMA, the "
          "vector units the kernels are written for")


def _load() -> str:
  """"" once the kernels are registered with XLA, else why not."""
  import ctypes  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  problem = vector_isa_problem()
  if problem:
    return problem
  try:
    path = build()
    try:
      library = ctypes.cdll.LoadLibrary(path)
    except OSError:  # a damaged cache entry: build it again, once
      os.unlink(path)
      library = ctypes.cdll.LoadLibrary(build())
    for name, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(f"rebll_conv_{name}",
                                  jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform="cpu")
  except (RuntimeError, OSError, AttributeError) as e:
    return str(e)
  return ""


@functools.lru_cache(maxsize=None)
def warn_unavailable():
  """Logs once why the kernels are unavailable (``conv_impl=auto``'s
  fallback; an explicit ``kernel`` is a config error instead)."""
  log.warning("CPU convolution kernels unavailable (%s): XLA's convolutions "
              "run instead (model.conv_impl=gemm)", unavailable_reason())


def available() -> bool:
  """True when the kernels are compiled, loaded and registered."""
  return not _load()


def unavailable_reason() -> str:
  """Why ``available()`` is False ("" when it is True)."""
  return _load()


THREADS_ENV = "REBLL_CPU_KERNEL_THREADS"


def forced_threads() -> int | None:
  """$REBLL_CPU_KERNEL_THREADS as a thread count (None where unset);
  ValueError where it is not a positive integer."""
  forced = os.environ.get(THREADS_ENV, "")
  if not forced:
    return None
  if not forced.isdigit() or int(forced) < 1:
    raise ValueError(f"${THREADS_ENV} must be a positive integer (threads "
                     f"per kernel call), got {forced!r}")
  return int(forced)


@functools.lru_cache(maxsize=None)
def threads_per_device() -> int:
  """Each call's thread count: $REBLL_CPU_KERNEL_THREADS if set, else the
  host cores per local CPU device."""
  import jax  # pylint: disable=g-import-not-at-top
  forced = forced_threads()
  if forced:
    return forced
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cores = os.cpu_count() or 1
  return max(1, cores // max(1, len(jax.local_devices(backend="cpu"))))


STRIDES = ((1, 1), (2, 2))


def supports(x_shape, w_shape, strides, dtype,
             max_channels: int | None = MAX_CHANNELS) -> dict:
  """{"forward": bool, "filter_grad": bool, "input_grad": bool}: which
  passes of this convolution the kernels can run (the input gradient of a
  strided one as stride-1 phase convolutions, ``conv._input_grad_phases``).
  ``max_channels``: where the kernels stop winning (None: no cap)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  ok = (available() and tuple(strides) in STRIDES and dtype == jnp.float32
        and len(x_shape) == 4 and (max_channels is None or max(
            w_shape[2], w_shape[3]) <= max_channels))
  cin, cout = w_shape[2], w_shape[3]
  return {"forward": ok and cout % CHANNEL_MULTIPLE == 0,
          "filter_grad": ok and cout % CHANNEL_MULTIPLE == 0,
          "input_grad": ok and cin % CHANNEL_MULTIPLE == 0}


def _ffi(name: str, out_shape: tuple, a, b, threads: int, **attrs):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if not available():  # registers the targets on first use
    raise RuntimeError(f"CPU kernels unavailable: {unavailable_reason()}")
  attrs = {k: np.int64(v) for k, v in attrs.items()}
  return jax.ffi.ffi_call(f"rebll_conv_{name}",
                          jax.ShapeDtypeStruct(out_shape, jnp.float32))(
                              a, b, threads=np.int64(threads), **attrs)


def _batch_axes(sharding):
  """The mesh axes the leading (batch) dimension is sharded over, or None."""
  spec = getattr(sharding, "spec", None)
  return spec[0] if spec else None


def _partitioned(local_fn, reduce_batch: bool, rule: str, **factors):
  # Shardy wants the special factors in the rule's order of first use.
  """``local_fn(a, b, static)`` as a custom_partitioning function: both
  operands keep their batch sharding (other dimensions replicated); the
  result is batch-sharded, or replicated and summed over the batch axes
  (``reduce_batch``)."""
  from jax.experimental.custom_partitioning import custom_partitioning  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top

  @functools.partial(custom_partitioning, static_argnums=(2,))
  def call(a, b, static):
    return local_fn(a, b, static)

  def shardings(mesh, arg_shapes):
    axes = _batch_axes(arg_shapes[0].sharding)
    batch = NamedSharding(mesh, PartitionSpec(axes))
    args = (batch, batch if reduce_batch else NamedSharding(mesh,
                                                            PartitionSpec()))
    out = NamedSharding(mesh, PartitionSpec() if reduce_batch else
                        PartitionSpec(axes))
    return axes, args, out

  def infer(static, mesh, arg_shapes, result_shape):
    del static, result_shape
    return shardings(mesh, arg_shapes)[2]

  def partition(static, mesh, arg_shapes, result_shape):
    del result_shape
    axes, args, out = shardings(mesh, arg_shapes)

    def lower(a, b):
      y = local_fn(a, b, static)
      return jax.lax.psum(y, axes) if reduce_batch and axes else y
    return mesh, lower, out, args

  call.def_partition(partition, infer_sharding_from_operands=infer,
                     sharding_rule=rule, **factors)
  return call


@functools.lru_cache(maxsize=None)
def _forward_call():
  def local(x, w, static):
    ((pt, pb), (pl, pr)), stride, threads = static
    # The kernel pads each image in its own buffer: an XLA pad here would
    # write a padded copy of the batch, and XLA fuses the pad with the
    # input's producer (a batch norm + ReLU), which then runs twice when the
    # unpadded input is needed as well (the filter gradient).
    n, h, wd, _ = x.shape
    kh, kw, _, cout = w.shape
    out = (n, (h + pt + pb - kh) // stride + 1,
           (wd + pl + pr - kw) // stride + 1, cout)
    return _ffi("forward", out, x, w, threads, stride=stride, pad_top=pt,
                pad_bottom=pb, pad_left=pl, pad_right=pr)
  return _partitioned(local, False, "n h w c, k l c o -> n y x o",
                      need_replication_factors=("h", "w", "c", "k", "l",
                                                "o", "y", "x"))


@functools.lru_cache(maxsize=None)
def _filter_grad_call():
  def local(x, g, static):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    (kh, kw), padding, stride, threads = static
    (pt, _), (pl, _) = padding
    if x.shape[-1] % SMALL_CIN_MULTIPLE:
      # Few input channels (an RGB stem): padded here, the kernel then
      # takes whole rows of taps at once (FilterGradRowTaps).
      x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
      pt = pl = 0
    return _ffi("filter_grad", (kh, kw, x.shape[-1], g.shape[-1]), x, g,
                threads, pad_top=pt, pad_left=pl, stride=stride)
  return _partitioned(local, True, "n h w c, n y x o -> k l c o",
                      reduction_factors=("n",),
                      need_replication_factors=("h", "w", "c", "y", "x", "o"))


def _pads(padding) -> tuple:
  return tuple((int(a), int(b)) for a, b in padding)


def _stride(stride) -> int:
  stride = int(stride)
  if (stride, stride) not in STRIDES:
    raise ValueError(f"stride {stride}: the kernels take {STRIDES}")
  return stride


def conv_forward(x, w, padding, threads: int | None = None, stride: int = 1):
  """NHWC x HWIO convolution at ``stride`` (1 or 2, both dimensions);
  ``padding`` ((top, bottom), (left, right)). float32; cout a multiple of 16
  (``supports``). ``threads``: per call (default ``threads_per_device()``)."""
  threads = int(threads or threads_per_device())
  return _forward_call()(x, w, (_pads(padding), _stride(stride), threads))


def filter_grad(x, g, kernel_size, padding, threads: int | None = None,
                stride: int = 1):
  """dL/dW [kh, kw, cin, cout] of the convolution of ``x`` (at ``stride``)
  whose output cotangent is ``g``."""
  threads = int(threads or threads_per_device())
  return _filter_grad_call()(
      x, g, (tuple(int(k) for k in kernel_size), _pads(padding),
             _stride(stride), threads))
