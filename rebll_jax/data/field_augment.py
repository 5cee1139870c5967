"""The field's training augmentation, on the host (``augment.policy=field``).

The PyTorch baseline (KRT, after ASL) trains on
``Resize -> CutoutPIL(0.5) -> RandAugment() -> ToTensor`` where
``RandAugment`` is the one of the PyPI package ``randaugment`` 1.0.2. Its ops
are PIL's (bicubic shears, nearest-neighbour translations and rotations,
PIL's enhancers and histogram ops), whose integer rounding a jitted version
would not reproduce, so this policy runs here, per image, in the loader's
producer thread, and the device only converts uint8 to float.

The transform of one square uint8 [H, W, 3] image (the loader's images are
already squash-resized):

1. **Flip** (``augment.flip``; the baseline has none): horizontal, p = 0.5.
2. **CutoutPIL** (``augment.cutout`` = f > 0): ``c = int(f * H + 0.5)``,
   centre ``(y, x)`` uniform over the pixels, then the rows
   ``clip(y - c//2, 0, H) .. clip(y + c//2, 0, H)`` and likewise the columns,
   both ends included (PIL's ``ImageDraw.rectangle``), filled with a random
   RGB colour (``augment.cutout_fill=random``, each channel uniform in
   0..255) or 128 grey (``grey``).
3. **RandAugment**: one sub-policy drawn uniformly from the package's fixed
   table: every ordered pair of entries ``(op, level)``, op from ``OPS``,
   level 1..9 (15 * 9 = 135 entries, 18225 pairs). Each of the two ops runs
   with probability 0.5 at the magnitude of its level (``magnitude``); the
   ops marked signed take a random sign. Fill of geometric ops: 128 grey.

   ============ ==========================================================
   Invert       255 - v
   Cutout       square of side 2 * (s//2), s = round(20 * level / 9)
                pixels (absolute, whatever the image size), centre uniform,
                clipped, filled with (125, 122, 113)
   Sharpness    PIL ImageEnhance.Sharpness, factor 1 ± 0.1 level
   AutoContrast PIL ImageOps.autocontrast (no cutoff)
   Posterize    keep the top round(8 - 4 level / 9) bits
   ShearX/Y     PIL affine (1, ±s, 0, 0, 1, 0) / (1, 0, 0, ±s, 1, 0) about
                the top-left corner, bicubic, s = 0.3 level / 9
   TranslateX/Y ± (150 / 331) (level / 9) of the width / height, nearest
   Rotate       + 30 level / 9 degrees (counter-clockwise; never negative,
                as in the package), about the centre, nearest
   Equalize     PIL ImageOps.equalize
   Contrast     PIL ImageEnhance.Contrast, factor 1 ± 0.1 level
   Color        PIL ImageEnhance.Color, factor 1 ± 0.1 level
   Solarize     v < t ? v : 255 - v, t = 256 - 256 level / 9
   Brightness   PIL ImageEnhance.Brightness, factor 1 ± 0.1 level
   ============ ==========================================================

Randomness: every draw of an image comes from its own numpy Generator
seeded by ``(seed, task, step, row)`` (``row`` = position in the global
batch), so a batch is a pure function of the step (resume is exact) and each
host computes its rows exactly as a single host would. The draws are made
first (``draw``), then applied (``apply``), which is also how the tests feed
this code the draws of the reference package.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from rebll_jax.data.augment import CUTOUT_FILLS
from rebll_jax.errors import UserError

OPS = ("Invert", "Cutout", "Sharpness", "AutoContrast", "Posterize",
       "ShearX", "TranslateX", "TranslateY", "ShearY", "Rotate", "Equalize",
       "Contrast", "Color", "Solarize", "Brightness")
LEVELS = tuple(range(1, 10))
OP_PROB = 0.5  # every op of every sub-policy
SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Color",
                    "Contrast", "Sharpness", "Brightness"})
ENTRIES = tuple((op, level) for op in OPS for level in LEVELS)
NUM_POLICIES = len(ENTRIES) ** 2

GEOMETRIC_FILL = (128, 128, 128)
OP_CUTOUT_FILL = (125, 122, 113)
GREY_FILL = (128, 128, 128)

# Magnitude of each level 0..9 (the AutoAugment ranges). np.linspace so the
# values are the reference's to the last bit (its end point is exact).
_RANGES = {
    "ShearX": np.linspace(0, 0.3, 10), "ShearY": np.linspace(0, 0.3, 10),
    "TranslateX": np.linspace(0, 150 / 331, 10),
    "TranslateY": np.linspace(0, 150 / 331, 10),
    "Rotate": np.linspace(0, 30, 10),
    "Color": np.linspace(0.0, 0.9, 10), "Contrast": np.linspace(0.0, 0.9, 10),
    "Sharpness": np.linspace(0.0, 0.9, 10),
    "Brightness": np.linspace(0.0, 0.9, 10),
    "Posterize": np.round(np.linspace(8, 4, 10)).astype(np.int64),
    "Solarize": np.linspace(256, 0, 10),
    "Cutout": np.round(np.linspace(0, 20, 10)).astype(np.int64),
    "AutoContrast": np.zeros(10), "Equalize": np.zeros(10),
    "Invert": np.zeros(10),
}


def magnitude(op: str, level: int):
  """The magnitude of ``op`` at ``level`` (0..9)."""
  value = _RANGES[op][level]
  return int(value) if op in ("Posterize", "Cutout") else float(value)


def sub_policy(index: int) -> tuple[tuple[float, str, int], ...]:
  """Sub-policy ``index`` of the table: ((p, op, level), (p, op, level))."""
  first, second = divmod(int(index), len(ENTRIES))
  return tuple((OP_PROB, *ENTRIES[i]) for i in (first, second))


# ----------------------------------------------------------------- the ops
def _pil(x):
  return Image.fromarray(np.ascontiguousarray(x, np.uint8), "RGB")


def _enhance(enhancer, x, factor):
  return np.asarray(enhancer(_pil(x)).enhance(factor))


def _affine(x, coeffs, resample):
  img = _pil(x)
  return np.asarray(img.transform(img.size, Image.Transform.AFFINE, coeffs,
                                  resample, fillcolor=GEOMETRIC_FILL))


def _fill_box(x, y0, y1, x0, x1, colour):
  out = x.copy()
  out[y0:y1, x0:x1] = np.asarray(colour, np.uint8)
  return out


def apply_op(x: np.ndarray, op: str, level: int, sign: int = 1,
             centre: Sequence[int] = (0, 0)) -> np.ndarray:
  """One RandAugment op on a uint8 [H, W, 3] image; returns a new array.

  Args:
    op, level: an entry of ``ENTRIES`` (level 0..9).
    sign: +1 / -1, used by the ops in ``SIGNED``.
    centre: (x, y) pixel of the ``Cutout`` op's square.
  """
  m = magnitude(op, level)
  h, w = x.shape[:2]
  if op == "Invert":
    return 255 - x
  if op == "Cutout":
    half = m // 2
    cx, cy = int(centre[0]), int(centre[1])
    return _fill_box(x, max(0, cy - half), min(h, cy + half),
                     max(0, cx - half), min(w, cx + half), OP_CUTOUT_FILL)
  if op == "Posterize":
    return x & np.uint8((0xFF << (8 - m)) & 0xFF)
  if op == "Solarize":
    return np.where(x < m, x, 255 - x).astype(np.uint8)
  if op == "AutoContrast":
    return np.asarray(ImageOps.autocontrast(_pil(x)))
  if op == "Equalize":
    return np.asarray(ImageOps.equalize(_pil(x)))
  if op == "Rotate":
    return np.asarray(_pil(x).rotate(m, fillcolor=GEOMETRIC_FILL))
  s = m * sign
  if op == "ShearX":
    return _affine(x, (1, s, 0, 0, 1, 0), Image.Resampling.BICUBIC)
  if op == "ShearY":
    return _affine(x, (1, 0, 0, s, 1, 0), Image.Resampling.BICUBIC)
  if op == "TranslateX":
    return _affine(x, (1, 0, s * w, 0, 1, 0), Image.Resampling.NEAREST)
  if op == "TranslateY":
    return _affine(x, (1, 0, 0, 0, 1, s * h), Image.Resampling.NEAREST)
  enhancers = {"Sharpness": ImageEnhance.Sharpness,
               "Contrast": ImageEnhance.Contrast,
               "Color": ImageEnhance.Color,
               "Brightness": ImageEnhance.Brightness}
  if op in enhancers:
    return _enhance(enhancers[op], x, 1.0 + s)
  raise ValueError(f"unknown RandAugment op {op!r}; valid: {list(OPS)}")


# ------------------------------------------------------------ the pipeline
@dataclasses.dataclass(frozen=True)
class Draws:
  """Every random choice of one image's transform."""

  flip: bool
  cutout_centre: tuple[int, int]  # (y, x) of CutoutPIL
  cutout_colour: tuple[int, int, int]  # its fill when cutout_fill=random
  policy: int  # index into the sub-policy table
  applied: tuple[bool, bool]  # each op of the sub-policy runs
  signs: tuple[int, int]
  op_centres: tuple[tuple[int, int], tuple[int, int]]  # (x, y), Cutout op


def draw(rng: np.random.Generator, height: int, width: int) -> Draws:
  """All draws of one image (a fixed number, whatever gets used)."""
  cy, cx = rng.integers(0, (height, width))
  colour = rng.integers(0, 256, 3)
  policy = rng.integers(0, NUM_POLICIES)
  applied = rng.random(2) < OP_PROB
  signs = rng.choice(np.array([-1, 1]), 2)
  centres = rng.integers(0, (width, height), size=(2, 2))
  return Draws(flip=bool(rng.random() < 0.5),
               cutout_centre=(int(cy), int(cx)),
               cutout_colour=tuple(int(v) for v in colour),
               policy=int(policy), applied=tuple(bool(a) for a in applied),
               signs=tuple(int(s) for s in signs),
               op_centres=tuple((int(a), int(b)) for a, b in centres))


def cutout_pil(x: np.ndarray, fraction: float, centre: Sequence[int],
               colour: Sequence[int]) -> np.ndarray:
  """The baseline's CutoutPIL at centre (y, x): see the module docstring."""
  h, w = x.shape[:2]
  half_h = int(fraction * h + 0.5) // 2
  half_w = int(fraction * w + 0.5) // 2
  cy, cx = int(centre[0]), int(centre[1])
  y0, y1 = np.clip([cy - half_h, cy + half_h], 0, h)
  x0, x1 = np.clip([cx - half_w, cx + half_w], 0, w)
  return _fill_box(x, y0, y1 + 1, x0, x1 + 1, colour)  # ends included


def randaugment(x: np.ndarray, draws: Draws) -> np.ndarray:
  """The drawn sub-policy applied to a uint8 image."""
  for (_, op, level), applied, sign, centre in zip(
      sub_policy(draws.policy), draws.applied, draws.signs, draws.op_centres):
    if applied:
      x = apply_op(x, op, level, sign, centre)
  return x


def apply(x: np.ndarray, draws: Draws, *, flip: bool, cutout: float,
          cutout_fill: str) -> np.ndarray:
  """The whole host transform of one uint8 [H, W, 3] image."""
  if flip and draws.flip:
    x = x[:, ::-1]
  if cutout > 0:
    colour = draws.cutout_colour if cutout_fill == "random" else GREY_FILL
    x = cutout_pil(x, cutout, draws.cutout_centre, colour)
  return randaugment(np.ascontiguousarray(x), draws)


@dataclasses.dataclass(frozen=True)
class HostAugment:
  """The per-batch host transform the loader applies (policy=field).

  ``workers`` > 1 spreads a batch's images over that many threads (PIL
  releases the GIL inside its ops); the result does not depend on it.
  """

  flip: bool = False
  cutout: float = 0.5
  cutout_fill: str = "random"
  workers: int = 1

  def __post_init__(self):
    if self.cutout_fill not in CUTOUT_FILLS:
      raise UserError(f"unknown augment.cutout_fill {self.cutout_fill!r}; "
                      f"valid: {list(CUTOUT_FILLS)}")

  def one(self, image: np.ndarray, *, seed: int, task: int, step: int,
          row: int) -> np.ndarray:
    """The transform of one image at global batch row ``row`` of ``step``."""
    rng = np.random.default_rng([seed, task, step, int(row), _STREAM])
    return apply(image, draw(rng, *image.shape[:2]), flip=self.flip,
                 cutout=self.cutout, cutout_fill=self.cutout_fill)

  def __call__(self, images: np.ndarray, *, seed: int, task: int, step: int,
               rows: np.ndarray) -> np.ndarray:
    """uint8 [n, H, W, 3] -> uint8 [n, H, W, 3]; ``rows`` = global rows."""
    out = np.empty_like(images)

    def work(i):
      out[i] = self.one(images[i], seed=seed, task=task, step=step,
                        row=int(rows[i]))

    if self.workers > 1 and len(images) > 1:
      list(_executor(self.workers).map(work, range(len(images))))
    else:
      for i in range(len(images)):
        work(i)
    return out


_EXECUTORS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def _executor(workers: int) -> concurrent.futures.ThreadPoolExecutor:
  # One pool per size for the whole process: the loader builds a
  # HostAugment per task, threads need not be restarted each time.
  if workers not in _EXECUTORS:
    _EXECUTORS[workers] = concurrent.futures.ThreadPoolExecutor(
        workers, thread_name_prefix="field_augment")
  return _EXECUTORS[workers]


_STREAM = 0xF1E1D  # keeps these streams apart from the loader's shuffles


def from_config(augment_cfg, workers: int = 1) -> HostAugment | None:
  """The host transform of ``config.augment``; None unless policy=field.

  ``workers``: threads per batch (e.g. ``config.data.num_workers``).
  """
  if augment_cfg.policy != "field":
    return None
  return HostAugment(flip=bool(augment_cfg.flip),
                     cutout=float(augment_cfg.cutout),
                     cutout_fill=str(augment_cfg.cutout_fill),
                     workers=max(1, int(workers)))
