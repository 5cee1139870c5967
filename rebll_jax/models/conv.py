"""One convolution module for every backbone, with a CPU-fast backward pass.

``Conv`` is a drop-in for ``flax.linen.Conv`` as the backbones use it (NHWC
inputs, HWIO ``kernel``, optional ``bias``, explicit padding, no dilation, no
groups): same parameter names, shapes, dtypes and initialisers, so
checkpoints and the PyTorch converter see no difference. What differs is how
the gradient of the filter is computed, chosen by ``impl``:

- ``"xla"``: ``lax.conv_general_dilated`` and its automatic transpose rules.
- ``"matmul_grad"``: the same forward convolution and input gradient, but the
  filter gradient of every 1x1 convolution is one GEMM, ``dW = x^T g`` over
  all N*H*W output positions (strided rows for a stride-2 shortcut). XLA's
  CPU backend runs filter-gradient convolutions through its convolution
  kernel with the whole feature map as the "filter", 3-4x slower than a
  GEMM for 1x1 convs (measured at batch 16, 28x28x256 -> 64: 52 ms vs
  14 ms). k x k convolutions keep XLA's gradient: written as k*k shifted,
  strided slice GEMMs (or one im2col GEMM) they measured 1.3-2x *slower*
  than XLA's own on this 2-core machine (3x3 at 28x28x64: 34 ms XLA,
  45-67 ms as slices, 62-117 ms as im2col; 7x7 stem: 39-52 ms vs 54-80 ms).
  One exception: k x k convolutions whose output map has at most
  ``SMALL_MAP`` (2) rows or columns run entirely (forward and both
  gradients) as k*k tap GEMMs, because XLA's CPU convolution is
  pathological there (3x3, 512 -> 512 channels on a 2x2 map, batch 16:
  443 ms forward, 445 ms input gradient; a few ms as GEMMs). That is
  ResNet-50's layer 4 at 64 px; at 224 px no layer qualifies.
- ``"gemm"``: every shape routed to the formulation measured fastest on
  XLA:CPU (2 cores, jax 0.10). 1x1 convolutions are one dot (forward and
  both gradients by autodiff: GEMMs); XLA's convolution loses to a dot most
  where cin > cout (56x56, 256 -> 64, batch 16: 64 vs 23 ms forward).
  Convolutions of at most ``IM2COL_MAX_CIN`` input channels (RGB stems) are
  one im2col GEMM. Other k x k convolutions keep XLA's forward, but (custom
  VJP) their strided input gradient is computed by phases (s*s stride-1
  convolutions instead of one over a zero-dilated map: 1/s^2 of the
  multiply-adds), and their filter gradient reads its operands through a
  fusion barrier: without it XLA recomputes each conv input's batch norm +
  ReLU inside the transposes that feed the filter-gradient convolution, in
  transposed (cache-hostile) order, which was 30% of the small ResNet's
  backward pass. Small output maps keep the tap GEMMs.
- ``"kernel"``: ``gemm``, with the forward, input gradient and filter
  gradient of k x k convolutions (stride 1 or 2) of at most 64 channels on our own
  C++ kernels (``rebll_jax.models.cpu_kernels``, XLA's FFI) where their
  shapes allow (``cpu_kernels.supports``), RGB stems included (instead of
  im2col: ResNet-50's 7x7 stem at 224 px, batch 16, forward 126 -> 40 ms,
  filter gradient 178 -> 19 ms), and the filter gradient of 1x1
  convolutions on large maps with at most 256 output channels
  (``KERNEL_1X1_DW_*``). On the default experiment's
  step, two CPU devices, XLA's Eigen convolutions there ran at well under
  the kernels' speed; wider convolutions stay on XLA's GEMMs, which win.
- ``"auto"`` (the default, ``config.model.conv_impl``): on the CPU,
  ``kernel`` where the kernels build (a C++ compiler), else ``gemm``;
  ``xla`` elsewhere (GPU/TPU compilers have good filter-gradient
  convolutions, and the rewrite would cost memory).

All implementations compute the same function and gradients (tested to
float32 rounding in tests/test_fast_conv.py).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rebll_jax.models import cpu_kernels

IMPLS = ("auto", "xla", "matmul_grad", "gemm", "kernel")
_DIMS = ("NHWC", "HWIO", "NHWC")


def resolve_impl(impl: str) -> str:
  """"auto" -> "kernel" on a CPU backend where our kernels build, else
  "gemm"; "xla" on other backends."""
  if impl not in IMPLS:
    raise ValueError(f"unknown model.conv_impl {impl!r}; valid: {list(IMPLS)}")
  if impl == "auto":
    if jax.default_backend() != "cpu":
      return "xla"
    if cpu_kernels.available():
      return "kernel"
    cpu_kernels.warn_unavailable()
    return "gemm"
  return impl


def _xla_conv(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding,
                                      dimension_numbers=_DIMS)


def _filter_grad_1x1(x, g, strides):
  """dL/dW [1, 1, cin, cout] of a 1x1 conv: x^T g over all positions.

  The strided input rows a stride-s 1x1 conv reads, flattened to [P, cin],
  times the output cotangent flattened to [P, cout]: one GEMM.
  """
  sh, sw = strides
  _, oh, ow, cout = g.shape
  xs = x[:, :(oh - 1) * sh + 1:sh, :(ow - 1) * sw + 1:sw]
  acc = jnp.promote_types(x.dtype, jnp.float32)
  dw = jnp.matmul(xs.reshape(-1, x.shape[-1]).T, g.reshape(-1, cout),
                  preferred_element_type=acc)
  return dw[None, None]


def _tap_conv(x, w, strides, padding):
  """The conv as a sum over filter taps of GEMMs (small maps; autodiff).

  y = sum_ij slice_ij(x_padded) @ w[i, j]; its gradients (by autodiff) are
  pads, strided slices and GEMMs too.
  """
  kh, kw, cin, cout = w.shape
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  n = x.shape[0]
  oh = (xp.shape[1] - kh) // sh + 1
  ow = (xp.shape[2] - kw) // sw + 1
  y = 0
  for i in range(kh):
    for j in range(kw):
      xs = xp[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw]
      y = y + xs.reshape(-1, cin) @ w[i, j]
  return y.reshape(n, oh, ow, cout)


# Output maps with at most this many rows or columns run as tap GEMMs under
# matmul_grad: XLA's CPU convolution is pathological there (ResNet-50's
# layer 4 at 64 px, a 2x2 map: 3x3 conv forward 443 ms, input gradient
# 445 ms, as tap GEMMs a few ms).
SMALL_MAP = 2


@functools.lru_cache(maxsize=None)
def _matmul_grad_conv(strides: tuple, padding: tuple) -> Callable:
  """A 1x1 conv(x, w) whose filter gradient is one GEMM (custom VJP)."""

  @jax.custom_vjp
  def conv(x, w):
    return _xla_conv(x, w, strides, padding)

  def fwd(x, w):
    return _xla_conv(x, w, strides, padding), (x, w)

  def bwd(residuals, g):
    x, w = residuals
    # The input gradient keeps XLA's transposed convolution (its CPU speed is
    # fine); only the filter gradient is rewritten.
    _, input_vjp = jax.vjp(lambda x_: _xla_conv(x_, w, strides, padding), x)
    (dx,) = input_vjp(g)
    dw = _filter_grad_1x1(x, g, strides).astype(w.dtype)
    return dx, dw

  conv.defvjp(fwd, bwd)
  return conv


# ------------------------------------------------------------------ gemm ---

# Parts of the "gemm" impl (a set so experiments can switch one off).
GEMM_PARTS = frozenset({"dot1x1", "phase_dx", "barrier", "im2col"})
# The passes of k x k convolutions "kernel" gives to our own CPU
# kernels (rebll_jax.models.cpu_kernels), where their shapes allow.
KERNEL_PASSES = frozenset({"filter_grad", "forward", "input_grad"})
# k x k convolutions with at most this many input channels (the RGB stems)
# run as one im2col GEMM.
IM2COL_MAX_CIN = 4


def _conv1x1_dot(x, w, strides):
  """A 1x1 conv as one GEMM over the (strided) positions; autodiff gives
  GEMMs for both gradients (and an interior pad for a strided input)."""
  sh, sw = strides
  xs = x[:, ::sh, ::sw] if (sh, sw) != (1, 1) else x
  n, oh, ow, cin = xs.shape
  y = jnp.dot(xs.reshape(-1, cin), w.reshape(cin, -1))
  return y.reshape(n, oh, ow, -1)


# 1x1 filter gradients our kernel runs faster than XLA's GEMM: output maps of
# at least this many rows and columns, at most this many output channels
# (2 cores, ResNet-50's shapes at 224 px, batch 16: 56x56 256 -> 64
# 19.8 -> 12.9 ms, 28x28 512 -> 128 24.5 -> 13.9; 7x7 maps and 512 or more
# output channels lose, e.g. 14x14 1024 -> 512 23.5 -> 27.1).
KERNEL_1X1_DW_MIN_MAP = 14
KERNEL_1X1_DW_MAX_COUT = 256


def _kernel_takes_1x1_dw(x, w, strides, parts) -> bool:
  _, h, wd, _ = x.shape
  out_map = min(-(-h // strides[0]), -(-wd // strides[1]))
  return ("filter_grad" in parts and out_map >= KERNEL_1X1_DW_MIN_MAP
          and w.shape[3] <= KERNEL_1X1_DW_MAX_COUT
          and cpu_kernels.supports(x.shape, w.shape, strides, x.dtype,
                                   max_channels=None)["filter_grad"])


@functools.lru_cache(maxsize=None)
def _conv1x1_kernel_dw(strides: tuple) -> Callable:
  """``_conv1x1_dot`` whose filter gradient is our kernel (custom VJP)."""

  @jax.custom_vjp
  def conv(x, w):
    return _conv1x1_dot(x, w, strides)

  def fwd(x, w):
    return conv(x, w), (x, w)

  def bwd(residuals, g):
    x, w = residuals
    _, input_vjp = jax.vjp(lambda x_: _conv1x1_dot(x_, w, strides), x)
    (dx,) = input_vjp(g)
    dw = cpu_kernels.filter_grad(x, g, (1, 1), ((0, 0), (0, 0)),
                                 stride=strides[0])
    return dx, dw.astype(w.dtype)

  conv.defvjp(fwd, bwd)
  return conv


def _im2col_conv(x, w, strides, padding):
  """The conv as one GEMM of the k*k*cin patch matrix (for tiny cin)."""
  kh, kw, cin, cout = w.shape
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  oh = (xp.shape[1] - kh) // sh + 1
  ow = (xp.shape[2] - kw) // sw + 1
  cols = jnp.concatenate(
      [xp[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw]
       for i in range(kh) for j in range(kw)], axis=-1)
  return jnp.dot(cols, w.reshape(kh * kw * cin, cout))


def _xla_stride1(g, kernel, padding):
  return _xla_conv(g, kernel, (1, 1), padding)


def _input_grad_phases(g, w, x_shape, strides, padding, conv=_xla_stride1):
  """dL/dx of a strided conv as s*s stride-1 convs, one per output phase.

  XLA writes it as one convolution over g dilated with s-1 zeros between
  entries, so 3/4 of its multiply-adds (stride 2) hit zeros. Row t = s*u + r
  of the padded input only meets the taps a = r + s*a', through
  g[u - a']: a stride-1 "full" correlation of g with the flipped sub-kernel
  w[r::s, c::s]. The s*s phase maps are interleaved back and the padding
  cropped. ``conv(g, kernel, padding)``: the stride-1 convolution to use.
  """
  sh, sw = strides
  _, h, wd, cin = x_shape
  n, oh, ow, _ = g.shape
  hp = h + sum(padding[0])
  wp = wd + sum(padding[1])
  rows, cols = -(-hp // sh), -(-wp // sw)  # phase map sizes (ceil)
  phases = []
  for r in range(sh):
    for c in range(sw):
      sub = w[r::sh, c::sw]
      ka, kb = sub.shape[0], sub.shape[1]
      if ka == 0 or kb == 0:
        phases.append(jnp.zeros((n, rows, cols, cin), g.dtype))
        continue
      kernel = jnp.flip(sub, (0, 1)).swapaxes(2, 3)  # HWIO with I=cout
      pads = ((ka - 1, rows - oh), (kb - 1, cols - ow))
      # (a negative pad, a crop, only XLA's convolution takes)
      phase_conv = conv if min(rows - oh, cols - ow) >= 0 else _xla_stride1
      phases.append(phase_conv(g, kernel, pads))
  stacked = jnp.stack(phases, 0).reshape(sh, sw, n, rows, cols, cin)
  dxp = stacked.transpose(2, 3, 0, 4, 1, 5).reshape(n, rows * sh,
                                                    cols * sw, cin)
  return dxp[:, padding[0][0]:padding[0][0] + h,
             padding[1][0]:padding[1][0] + wd]


def _fusion_barrier(tree, token):
  """``tree`` unchanged, but materialised before its consumers read it.

  XLA:CPU expands ``optimization_barrier`` before fusion, so it cannot stop
  an elementwise producer (a batch norm + ReLU) from being recomputed
  inside the transposes that feed a filter-gradient convolution, in their
  cache-hostile order. A conditional on a runtime predicate is a boundary
  its fusion passes do not cross; both branches are the identity.
  ``token``: any traced scalar (the predicate is ``token == token``,
  false only for NaN, where either branch returns the same values).
  """
  return jax.lax.cond(token == token, lambda t: t,
                      lambda t: jax.tree.map(lambda a: a + 0, t), tree)


@functools.lru_cache(maxsize=None)
def _gemm_conv(strides: tuple, padding: tuple, parts: frozenset) -> Callable:
  """A k x k conv: XLA's forward; input gradient by phases when strided;
  XLA's filter gradient on materialised operands (custom VJP). With
  "kernel" parts: those passes on our CPU kernels where shapes allow."""

  def kernel_can(x, w, name):
    return (name in parts and
            cpu_kernels.supports(x.shape, w.shape, strides, x.dtype)[name])

  def forward(x, w):
    if kernel_can(x, w, "forward"):
      return cpu_kernels.conv_forward(x, w, padding, stride=strides[0])
    return _xla_conv(x, w, strides, padding)

  @jax.custom_vjp
  def conv(x, w):
    return forward(x, w)

  def fwd(x, w):
    return forward(x, w), (x, w)

  def bwd(residuals, g):
    x, w = residuals
    kh, kw = w.shape[:2]
    kernel_dx = kernel_can(x, w, "input_grad")
    # The transposed convolution's padding (stride 1): a negative one, a
    # crop, only XLA's convolution takes.
    pad_t = ((kh - 1 - padding[0][0], kh - 1 - padding[0][1]),
             (kw - 1 - padding[1][0], kw - 1 - padding[1][1]))
    if strides != (1, 1) and "phase_dx" in parts:
      dx = _input_grad_phases(
          g, w, x.shape, strides, padding,
          cpu_kernels.conv_forward if kernel_dx else _xla_stride1)
    elif kernel_dx and strides == (1, 1) and min(map(min, pad_t)) >= 0:
      # The flipped filter, cin <-> cout, over the padded cotangent.
      w_t = jnp.flip(w, (0, 1)).swapaxes(2, 3)
      dx = cpu_kernels.conv_forward(g, w_t, pad_t)
    else:
      _, input_vjp = jax.vjp(lambda x_: _xla_conv(x_, w, strides, padding), x)
      (dx,) = input_vjp(g)
    kernel_dw = kernel_can(x, w, "filter_grad")
    xb, gb = x, g
    if "barrier" in parts and not kernel_dw:  # XLA's convolution needs it
      xb, gb = _fusion_barrier((x, g), g.reshape(-1)[0])
    if kernel_dw:
      dw = cpu_kernels.filter_grad(xb, gb, (kh, kw), padding,
                                   stride=strides[0])
    else:
      _, filter_vjp = jax.vjp(lambda w_: _xla_conv(xb, w_, strides, padding),
                              w)
      (dw,) = filter_vjp(gb)
    return dx.astype(x.dtype), dw.astype(w.dtype)

  conv.defvjp(fwd, bwd)
  return conv


def _kernels_take_stem(x, w, strides, parts) -> bool:
  """Whether our kernels run this stem's forward and filter gradient (its
  input gradient is dead code in training: the images need none)."""
  can = cpu_kernels.supports(x.shape, w.shape, strides, x.dtype)
  return all(p in parts and can[p] for p in ("forward", "filter_grad"))


def _gemm_route(x, w, strides, padding, kernels: bool = False):
  parts = GEMM_PARTS | (KERNEL_PASSES if kernels else frozenset())
  kh, kw, cin, _ = w.shape
  no_pad = all(p == (0, 0) for p in padding)
  if kh == kw == 1 and no_pad and "dot1x1" in parts:
    if _kernel_takes_1x1_dw(x, w, strides, parts):
      return _conv1x1_kernel_dw(strides)(x, w)
    return _conv1x1_dot(x, w, strides)
  if kh == kw == 1 and no_pad:
    return _matmul_grad_conv(strides, padding)(x, w)
  oh = (x.shape[1] + sum(padding[0]) - kh) // strides[0] + 1
  ow = (x.shape[2] + sum(padding[1]) - kw) // strides[1] + 1
  if min(oh, ow) <= SMALL_MAP:
    return _tap_conv(x, w, strides, padding)
  if cin <= IM2COL_MAX_CIN and "im2col" in parts and not _kernels_take_stem(
      x, w, strides, parts):
    return _im2col_conv(x, w, strides, padding)
  return _gemm_conv(strides, padding, parts)(x, w)


def conv2d(x, w, *, strides: Sequence[int] = (1, 1),
           padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
           impl: str = "auto"):
  """NHWC x HWIO -> NHWC convolution with explicit padding.

  Args:
    x: [N, H, W, Cin] input.
    w: [kh, kw, Cin, Cout] filter (same dtype as ``x``).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)) zero padding.
    impl: "auto" | "xla" | "matmul_grad" | "gemm" | "kernel" (see the module
      docstring).
  """
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(a), int(b)) for a, b in padding)
  impl = resolve_impl(impl)
  if impl == "xla":
    return _xla_conv(x, w, strides, padding)
  if impl in ("gemm", "kernel"):
    return _gemm_route(x, w, strides, padding, kernels=impl == "kernel")
  if w.shape[0] == w.shape[1] == 1 and all(p == (0, 0) for p in padding):
    return _matmul_grad_conv(strides, padding)(x, w)
  oh = (x.shape[1] + sum(padding[0]) - w.shape[0]) // strides[0] + 1
  ow = (x.shape[2] + sum(padding[1]) - w.shape[1]) // strides[1] + 1
  if min(oh, ow) <= SMALL_MAP:
    return _tap_conv(x, w, strides, padding)
  return _xla_conv(x, w, strides, padding)


def _normalize_padding(padding, kernel_size):
  if isinstance(padding, str):
    if padding.upper() != "VALID":
      raise ValueError("Conv takes explicit padding or 'VALID' (XLA's "
                       "'SAME' pads asymmetrically at stride 2)")
    return tuple((0, 0) for _ in kernel_size)
  if isinstance(padding, int):
    return tuple((padding, padding) for _ in kernel_size)
  return tuple((int(a), int(b)) for a, b in padding)


class Conv(nn.Module):
  """``nn.Conv`` subset (2-D, explicit padding) with a selectable backward.

  Parameters ``kernel`` [kh, kw, Cin, features] and ``bias`` [features] are
  created exactly as ``nn.Conv`` creates them (float32, same default
  initialisers), so checkpoints are interchangeable.
  """

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Any = 1
  padding: Any = "VALID"
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.linear.default_kernel_init
  bias_init: Callable = nn.initializers.zeros_init()
  impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    kernel_size = tuple(self.kernel_size)
    strides = ((self.strides,) * 2 if isinstance(self.strides, int)
               else tuple(self.strides))
    padding = _normalize_padding(self.padding, kernel_size)
    kernel = self.param("kernel", self.kernel_init,
                        kernel_size + (x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    y = conv2d(x, kernel, strides=strides, padding=padding, impl=self.impl)
    if bias is not None:
      y = y + bias
    return y
