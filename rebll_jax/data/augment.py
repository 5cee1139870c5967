"""On-device image augmentation: pure, jittable, one key per example.

``augment_batch(key, images, cfg)`` maps uint8 ``[N, H, W, 3]`` images to
float32 ``[N, H, W, 3]`` in [0, 1] (or mean/std-normalised when asked). Every
example draws from its own key ``fold_in(key, i)`` (``i`` = row in the batch),
so a given (key, row) always gives the same result, whatever the batch size.
Shapes are static; the per-example function is ``vmap``-ped and every
random choice is an array, so one compiled executable serves every batch.

The training transform, in the order the field's code (ASL / KRT) applies it:

1. **Horizontal flip** with probability 0.5 (``cfg.flip``).
2. **Cutout** (``cfg.cutout`` > 0): a square of side ``round(cutout * H)``
   (and ``cutout * W``), centre uniform over the image, clipped at the
   borders (so it may be smaller near an edge), filled with 0.5 grey
   (``cfg.cutout_fill="grey"``) or, like the field's CutoutPIL, with a
   random colour, each channel uniform over the 256 levels ``k / 255``
   (``"random"``). Always applied.
3. **RandAugment** (``cfg.randaugment_ops`` ops per image, 0 disables), each
   op drawn uniformly, with replacement, from ``OPS`` below and applied with
   probability 1 at magnitude ``m = cfg.randaugment_magnitude`` in [0, 1]
   (m = 1 is level 10 of the usual 0-10 scale). A "±" op picks its sign at
   random with probability 0.5. Geometric ops resample bilinearly about the
   image centre and fill uncovered pixels with 0.5 grey.

   ============== =====================================================
   identity       unchanged
   autocontrast   per channel, stretch [min, max] to [0, 1] (no-op if flat)
   equalize       per channel histogram equalisation (PIL's algorithm,
                  on the 8-bit values)
   rotate         ± 30 m degrees
   solarize       invert pixels >= 1 - m
   color          saturation: blend with greyscale, factor 1 ± 0.9 m
   posterize      keep the top 8 - round(4 m) bits of each 8-bit value
   contrast       blend with the mean grey level, factor 1 ± 0.9 m
   brightness     scale by factor 1 ± 0.9 m
   sharpness      blend with PIL's 3x3 smoothing filter (borders kept),
                  factor 1 ± 0.9 m
   shear_x        ± 0.3 m (x += s * y)
   shear_y        ± 0.3 m (y += s * x)
   translate_x    ± 0.45 m of the width
   translate_y    ± 0.45 m of the height
   ============== =====================================================

   Results are clipped to [0, 1] after each op.

With ``cfg.policy="field"`` the whole training transform runs on the host
(``rebll_jax.data.field_augment``, in the loader) and ``augment_batch`` only
does the eval conversion below.

``eval_transform(images)`` is ``images / 255`` (plus the same optional
normalisation). With ``normalize=True`` both subtract the ImageNet mean and
divide by its std after augmentation (the field's recipe keeps it off).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rebll_jax.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

GREY = 0.5  # fill for Cutout and for pixels uncovered by geometric ops

POLICIES = ("ours", "field")  # where / how the training transform runs
CUTOUT_FILLS = ("grey", "random")

# The RandAugment op list; the index is what gets sampled. Geometric ops are
# handled by one shared affine warp, colour ops by a switch.
OPS = ("identity", "autocontrast", "equalize", "rotate", "solarize", "color",
       "posterize", "contrast", "brightness", "sharpness", "shear_x",
       "shear_y", "translate_x", "translate_y")
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_COLOR = ("autocontrast", "equalize", "solarize", "color", "posterize",
          "contrast", "brightness", "sharpness")


def normalize(x: jax.Array) -> jax.Array:
  """ImageNet mean/std normalisation of float images in [0, 1] (NHWC)."""
  mean = jnp.asarray(IMAGENET_MEAN, x.dtype)
  std = jnp.asarray(IMAGENET_STD, x.dtype)
  return (x - mean) / std


def eval_transform(images: jax.Array, normalize_images: bool = False
                   ) -> jax.Array:
  """uint8 [N, H, W, 3] -> float32 in [0, 1] (or normalised)."""
  x = images.astype(jnp.float32) / 255.0
  return normalize(x) if normalize_images else x


# ---------------------------------------------------------------- colour ops
def _grey(x):
  return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def _blend(degenerate, x, factor):
  return jnp.clip(degenerate + factor * (x - degenerate), 0.0, 1.0)


def _to_u8(x):
  return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.int32)


def _autocontrast(x, m, f):
  del m, f
  lo = x.min(axis=(0, 1))
  hi = x.max(axis=(0, 1))
  scale = jnp.where(hi > lo, 1.0 / jnp.maximum(hi - lo, 1e-6), 1.0)
  lo = jnp.where(hi > lo, lo, 0.0)
  return jnp.clip((x - lo) * scale, 0.0, 1.0)


def _equalize_channel(v):
  """PIL ImageOps.equalize on one int channel [H, W] in 0..255."""
  hist = jnp.bincount(v.reshape(-1), length=256)
  # PIL: step = (count of all pixels but those of the last non-empty bin)//255
  last = 255 - jnp.argmax(hist[::-1] > 0)
  step = (hist.sum() - hist[last]) // 255
  safe = jnp.maximum(step, 1)
  cum = jnp.cumsum(hist) - hist  # pixels strictly below each level
  lut = jnp.clip((cum + step // 2) // safe, 0, 255)
  out = lut[v]
  return jnp.where(step > 0, out, v)


def _equalize(x, m, f):
  del m, f
  v = _to_u8(x)
  out = jax.vmap(_equalize_channel, in_axes=2, out_axes=2)(v)
  return out.astype(jnp.float32) / 255.0


def _solarize(x, m, f):
  del f
  return jnp.where(x >= 1.0 - m, 1.0 - x, x)


def _color(x, m, f):
  del m
  g = _grey(x)[..., None]
  return _blend(g, x, f)


def _posterize(x, m, f):
  del f
  bits = 8 - jnp.round(4.0 * m).astype(jnp.int32)
  shift = 8 - bits
  v = _to_u8(x)
  v = jnp.right_shift(v, shift)
  v = jnp.left_shift(v, shift)
  return v.astype(jnp.float32) / 255.0


def _contrast(x, m, f):
  del m
  mean = _grey(x).mean()
  return _blend(mean, x, f)


def _brightness(x, m, f):
  del m
  return _blend(jnp.zeros_like(x), x, f)


def _sharpness(x, m, f):
  del m
  # PIL's SMOOTH kernel [[1,1,1],[1,5,1],[1,1,1]] / 13 on the interior.
  h, w = x.shape[0], x.shape[1]
  pad = jnp.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
  acc = 4.0 * x
  for dy in range(3):
    for dx in range(3):
      acc = acc + pad[dy:dy + h, dx:dx + w]
  smooth = acc / 13.0
  yy = jnp.arange(h)[:, None, None]
  xx = jnp.arange(w)[None, :, None]
  interior = (yy > 0) & (yy < h - 1) & (xx > 0) & (xx < w - 1)
  degenerate = jnp.where(interior, smooth, x)
  return _blend(degenerate, x, f)


_COLOR_FNS = {
    "autocontrast": _autocontrast, "equalize": _equalize,
    "solarize": _solarize, "color": _color, "posterize": _posterize,
    "contrast": _contrast, "brightness": _brightness,
    "sharpness": _sharpness,
}


# ------------------------------------------------------------- geometric ops
def _warp(x, inv):
  """Bilinear resample: output pixel p reads input at ``inv @ (p - c) + c``.

  ``inv`` is a 2x3 matrix acting on (y, x, 1) centred coordinates; pixels that
  fall outside the input are filled with ``GREY``.
  """
  h, w = x.shape[0], x.shape[1]
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - cy,
                        jnp.arange(w, dtype=jnp.float32) - cx, indexing="ij")
  sy = inv[0, 0] * yy + inv[0, 1] * xx + inv[0, 2] + cy
  sx = inv[1, 0] * yy + inv[1, 1] * xx + inv[1, 2] + cx
  y0 = jnp.floor(sy)
  x0 = jnp.floor(sx)
  wy = sy - y0
  wx = sx - x0
  y0 = y0.astype(jnp.int32)
  x0 = x0.astype(jnp.int32)
  out = jnp.zeros_like(x)
  for oy, ox, wgt in ((0, 0, (1 - wy) * (1 - wx)), (0, 1, (1 - wy) * wx),
                      (1, 0, wy * (1 - wx)), (1, 1, wy * wx)):
    yi = y0 + oy
    xi = x0 + ox
    inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
    v = x[jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1)]
    v = jnp.where(inside[..., None], v, GREY)
    out = out + wgt[..., None] * v
  return jnp.clip(out, 0.0, 1.0)


def _inverse_matrix(name, m, sign, h, w):
  """Inverse affine (output -> input, centred (y, x)) of a geometric op."""
  s = sign * m
  if name == "rotate":
    a = s * 30.0 * math.pi / 180.0
    c, n = jnp.cos(a), jnp.sin(a)
    return jnp.array([[c, -n, 0.0], [n, c, 0.0]])
  if name == "shear_x":
    return jnp.array([[1.0, 0.0, 0.0], [0.3 * s, 1.0, 0.0]]) * jnp.ones(())
  if name == "shear_y":
    return jnp.array([[1.0, 0.3 * s, 0.0], [0.0, 1.0, 0.0]]) * jnp.ones(())
  if name == "translate_x":
    return jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.45 * s * w]]) * jnp.ones(())
  if name == "translate_y":
    return jnp.array([[1.0, 0.0, 0.45 * s * h], [0.0, 1.0, 0.0]]) * jnp.ones(())
  raise ValueError(name)


def _apply_op(x, op, sign, m):
  """Apply ``OPS[op]`` (an int array) at magnitude ``m`` to one image."""
  h, w = x.shape[0], x.shape[1]
  factor = 1.0 + sign * 0.9 * m
  # Geometric: one warp whose matrix is selected by ``op`` (identity when the
  # op is not geometric), so the gather runs once per op slot.
  ident = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  mats = [ident] + [_inverse_matrix(n, m, sign, h, w) for n in _GEOMETRIC]
  geo_idx = jnp.zeros((), jnp.int32)
  for i, n in enumerate(_GEOMETRIC):
    geo_idx = jnp.where(op == OPS.index(n), i + 1, geo_idx)
  inv = jnp.stack(mats)[geo_idx]
  x = jnp.where(geo_idx > 0, _warp(x, inv), x)
  # Colour: a switch over identity + the colour ops.
  col_idx = jnp.zeros((), jnp.int32)
  for i, n in enumerate(_COLOR):
    col_idx = jnp.where(op == OPS.index(n), i + 1, col_idx)
  branches = [lambda x, m, f: x] + [_COLOR_FNS[n] for n in _COLOR]
  return jax.lax.switch(col_idx, branches, x, m, factor)


# ------------------------------------------------------------- the pipeline
def _cutout(x, key, frac, fill="grey"):
  h, w = x.shape[0], x.shape[1]
  ch = max(int(round(frac * h)), 1)
  cw = max(int(round(frac * w)), 1)
  ky, kx = jax.random.split(key)
  cy = jax.random.randint(ky, (), 0, h)
  cx = jax.random.randint(kx, (), 0, w)
  y0, y1 = cy - ch // 2, cy - ch // 2 + ch
  x0, x1 = cx - cw // 2, cx - cw // 2 + cw
  yy = jnp.arange(h)[:, None, None]
  xx = jnp.arange(w)[None, :, None]
  box = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
  if fill == "random":  # its own key: the grey path's draws stay as they are
    colour = jax.random.randint(jax.random.fold_in(key, 1), (3,), 0, 256)
    return jnp.where(box, colour.astype(x.dtype) / 255.0, x)
  return jnp.where(box, GREY, x)


def augment_one(key: jax.Array, image: jax.Array, *, flip: bool = True,
                cutout: float = 0.5, cutout_fill: str = "grey",
                randaugment_ops: int = 2,
                randaugment_magnitude: float = 0.3) -> jax.Array:
  """One uint8 [H, W, 3] image -> float32 [H, W, 3] in [0, 1]."""
  x = image.astype(jnp.float32) / 255.0
  k_flip, k_cut, k_ra = jax.random.split(key, 3)
  if flip:
    x = jnp.where(jax.random.bernoulli(k_flip), x[:, ::-1], x)
  if cutout > 0:
    x = _cutout(x, k_cut, float(cutout), cutout_fill)
  m = float(randaugment_magnitude)
  for k in jax.random.split(k_ra, int(randaugment_ops)):
    k_op, k_sign = jax.random.split(k)
    op = jax.random.randint(k_op, (), 0, len(OPS))
    sign = jnp.where(jax.random.bernoulli(k_sign), 1.0, -1.0)
    x = _apply_op(x, op, sign, m)
  return x


def augment_batch(key: jax.Array, images: jax.Array, cfg,
                  normalize_images: bool = False) -> jax.Array:
  """Training transform of a batch (see the module docstring).

  Args:
    key: a PRNG key; example ``i`` uses ``fold_in(key, i)``.
    images: uint8 [N, H, W, 3].
    cfg: the ``config.augment`` ConfigDict (read at trace time: its values
      are Python constants of the compiled function). With
      ``cfg.policy="field"`` the images were augmented on the host and this
      is ``eval_transform``.
    normalize_images: subtract ImageNet mean / divide by std at the end
      (``config.data.normalize``).

  Returns:
    float32 [N, H, W, 3], in [0, 1] unless normalised.
  """
  # Older hand-made configs lack the two fields: today's behaviour.
  policy = getattr(cfg, "policy", "ours")
  fill = getattr(cfg, "cutout_fill", "grey")
  if policy not in POLICIES:
    raise UserError(f"unknown augment.policy {policy!r}; valid: "
                    f"{list(POLICIES)}")
  if fill not in CUTOUT_FILLS:
    raise UserError(f"unknown augment.cutout_fill {fill!r}; valid: "
                    f"{list(CUTOUT_FILLS)}")
  if policy == "field":
    return eval_transform(images, normalize_images)
  n = images.shape[0]
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
  fn = lambda k, im: augment_one(  # noqa: E731
      k, im, flip=bool(cfg.flip), cutout=float(cfg.cutout),
      cutout_fill=fill, randaugment_ops=int(cfg.randaugment_ops),
      randaugment_magnitude=float(cfg.randaugment_magnitude))
  x = jax.vmap(fn)(keys, images)
  return normalize(x) if normalize_images else x


def apply_op_by_name(image: jax.Array, name: str, magnitude: float,
                     sign: float = 1.0) -> jax.Array:
  """Apply one named op to one float [H, W, 3] image (tests, inspection)."""
  if name not in OPS:
    raise ValueError(f"unknown op {name!r}; valid: {list(OPS)}")
  return _apply_op_jit(image, jnp.asarray(OPS.index(name)),
                       jnp.asarray(sign, jnp.float32),
                       jnp.asarray(magnitude, jnp.float32))


_apply_op_jit = jax.jit(_apply_op)
