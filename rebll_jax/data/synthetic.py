"""The synthetic multi-label benchmark: procedurally drawn images, no files.

20 classes, each a distinct (shape, texture, colour) triple: ten shapes, solid
or striped, each class with its own colour. An image holds 1 to 4 objects of
different classes on a noisy gradient background with clutter (grey blobs and
lines that belong to no class). Classes have unequal frequencies and some pairs
tend to co-occur (as person and bicycle do), so partial task labels hide
objects the way they do on VOC/COCO. Everything is a function of the seed.

The *upstream* family (``upstream_classes``, ``generate_upstream``) is the
embedded stand-in for ImageNet: the same renderer with more shapes, textures
and colours, whose classes are (shape, texture, colour) triples that are
never a benchmark class (rebll_jax/upstream.py pretrains a backbone on it).
"""

from __future__ import annotations

import functools

import numpy as np

from rebll_jax.data.base import Source, Split

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring",
          "hbar", "vbar", "star", "ellipse")
TEXTURES = ("solid", "striped")
# Upstream only: shapes and textures the benchmark never draws.
UPSTREAM_SHAPES = SHAPES + ("hexagon", "crescent", "xcross", "semidisc",
                            "frame", "trapezoid")
UPSTREAM_TEXTURES = TEXTURES + ("checker", "gradient")
# One colour per class (RGB, 0-255), far apart in hue/brightness.
PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 230),
    (245, 130, 48), (160, 60, 220), (70, 240, 240), (240, 50, 230),
    (200, 245, 60), (250, 170, 200), (0, 200, 160), (180, 160, 255),
    (190, 120, 40), (255, 255, 170), (200, 20, 20), (150, 255, 190),
    (170, 170, 0), (255, 200, 140), (40, 60, 200), (255, 255, 255)],
    dtype=np.float32)
# Upstream only: twelve more colours (upstream colours are PALETTE + these).
UPSTREAM_EXTRA_COLOURS = np.array([
    (128, 0, 0), (0, 0, 128), (0, 128, 128), (255, 100, 0), (100, 255, 0),
    (0, 255, 100), (255, 0, 128), (128, 0, 255), (90, 90, 255),
    (255, 90, 90), (120, 70, 20), (100, 160, 40)], dtype=np.float32)
NUM_CLASSES = 20
# Pairs (a, b): when a is drawn, b joins with probability CO_OCCUR_PROB.
CO_OCCURRING = ((0, 9), (2, 13), (4, 17), (6, 1), (11, 18), (15, 3))
CO_OCCUR_PROB = 0.5


def class_names() -> tuple[str, ...]:
  return tuple(f"{TEXTURES[k // 10]}_{SHAPES[k % 10]}_{k:02d}"
               for k in range(NUM_CLASSES))


def _shape_mask(shape: str, dx, dy, radius):
  """Boolean mask of a shape centred at 0; dx, dy pixel offsets."""
  ax, ay = np.abs(dx), np.abs(dy)
  r = radius
  if shape == "circle":
    return dx**2 + dy**2 <= r**2
  if shape == "square":
    return np.maximum(ax, ay) <= 0.8 * r
  if shape == "triangle":
    return (dy <= 0.8 * r) & (dy >= -r + 2 * ax)
  if shape == "diamond":
    return ax + ay <= r
  if shape == "cross":
    return ((ax <= 0.3 * r) | (ay <= 0.3 * r)) & (np.maximum(ax, ay) <= r)
  if shape == "ring":
    d2 = dx**2 + dy**2
    return (d2 <= r**2) & (d2 >= (0.55 * r)**2)
  if shape == "hbar":
    return (ax <= r) & (ay <= 0.35 * r)
  if shape == "vbar":
    return (ay <= r) & (ax <= 0.35 * r)
  if shape == "star":
    angle = np.arctan2(dy, dx)
    return np.sqrt(dx**2 + dy**2) <= r * (0.55 + 0.45 * np.cos(5 * angle))
  if shape == "ellipse":
    return (dx / r)**2 + (dy / (0.5 * r))**2 <= 1.0
  if shape == "hexagon":  # flat top and bottom
    return (ay <= 0.866 * r) & (1.732 * ax + ay <= 1.732 * r)
  if shape == "crescent":
    return (dx**2 + dy**2 <= r**2) & ((dx - 0.45 * r)**2 + dy**2 > (0.8 * r)**2)
  if shape == "xcross":  # the cross turned by 45 degrees
    u, v = np.abs(dx + dy) * 0.7071, np.abs(dx - dy) * 0.7071
    return ((u <= 0.3 * r) | (v <= 0.3 * r)) & (np.maximum(u, v) <= r)
  if shape == "semidisc":
    return (dx**2 + dy**2 <= r**2) & (dy <= 0.2 * r)
  if shape == "frame":  # a hollow square
    side = np.maximum(ax, ay)
    return (side <= 0.85 * r) & (side >= 0.5 * r)
  if shape == "trapezoid":
    return (ay <= 0.6 * r) & (ax <= r * (0.75 - 0.4 * dy / r))
  raise ValueError(shape)


def _draw_classes(rng, frequencies):
  """Distinct classes of one image: 1-4 draws plus co-occurring partners."""
  count = rng.integers(1, 5)
  chosen = list(rng.choice(NUM_CLASSES, size=count, replace=False,
                           p=frequencies))
  for a, b in CO_OCCURRING:
    if a in chosen and b not in chosen and rng.random() < CO_OCCUR_PROB:
      chosen.append(b)
  return chosen[:4]


def _benchmark_objects(classes):
  """(shape, texture, colour) of each benchmark class in ``classes``."""
  return [(SHAPES[k % 10], TEXTURES[k // 10], PALETTE[k]) for k in classes]


def _render(rng, objects, size):
  """One image of ``objects``: (shape, texture, RGB colour) triples."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  # Background: a dark, weakly tinted grey gradient plus pixel noise, so
  # that the classes' saturated colours stand out from it.
  base = (rng.uniform(25, 75) + rng.uniform(-8, 8, size=3)).astype(np.float32)
  slope = (rng.uniform(-20, 20, size=(2, 1)) +
           rng.uniform(-4, 4, size=(2, 3))).astype(np.float32)
  image = (base + slope[0] * (xx[..., None] / size) +
           slope[1] * (yy[..., None] / size))
  image += rng.normal(0, 6, size=image.shape).astype(np.float32)
  # Clutter: grey blobs and lines that are no class.
  for _ in range(rng.integers(1, 4)):
    cx, cy = rng.uniform(0, size, 2)
    r = rng.uniform(0.04, 0.1) * size
    grey = rng.uniform(60, 160)
    if rng.random() < 0.5:
      m = (xx - cx)**2 + (yy - cy)**2 <= r**2
    else:
      m = (np.abs(yy - cy) <= 1) & (np.abs(xx - cx) <= 2.5 * r)
    image[m] = grey
  for shape, texture, base_colour in objects:
    radius = rng.uniform(0.15, 0.25) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    dx, dy = xx - cx, yy - cy
    mask = _shape_mask(shape, dx, dy, radius)
    colour = np.clip(base_colour + rng.normal(0, 12, 3), 0, 255)
    period = max(2, size // 16)
    if texture == "striped":
      stripes = (np.floor((xx + yy) / period) % 2) == 0
      fill = np.where(stripes[..., None], colour, colour * 0.35)
    elif texture == "checker":
      cells = (np.floor(xx / period) + np.floor(yy / period)) % 2 == 0
      fill = np.where(cells[..., None], colour, colour * 0.35)
    elif texture == "gradient":  # full colour on the left, dark on the right
      ramp = np.clip(0.5 - dx / (2 * radius), 0, 1)
      fill = colour * (0.3 + 0.7 * ramp[..., None])
    else:
      fill = np.broadcast_to(colour, image.shape)
    image[mask] = fill[mask]
  return np.clip(image, 0, 255).astype(np.uint8)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  if images.shape[1] == size:
    return images
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.stack([np.asarray(Image.fromarray(im).resize(
      (size, size), Image.BILINEAR)) for im in images])


@functools.lru_cache(maxsize=4)
def generate(num_images: int, seed: int, render_size: int):
  """Returns (images uint8 [N, S, S, 3], labels uint8 [N, 20])."""
  rng = np.random.default_rng(seed)
  # Unequal frequencies (a long tail), fixed by the seed.
  frequencies = np.sort(rng.uniform(0.4, 1.6, NUM_CLASSES))[::-1]
  frequencies = rng.permutation(frequencies)
  frequencies /= frequencies.sum()
  images = np.empty((num_images, render_size, render_size, 3), np.uint8)
  labels = np.zeros((num_images, NUM_CLASSES), np.uint8)
  for i in range(num_images):
    classes = _draw_classes(rng, frequencies)
    labels[i, classes] = 1
    images[i] = _render(rng, _benchmark_objects(classes), render_size)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


# ------------------------------------------------------------- upstream ---

# An upstream triple whose shape and texture are a benchmark class's must
# have a colour at least this far (RGB distance) from that class's colour;
# the benchmark's own two closest class colours are 56 apart.
UPSTREAM_MIN_COLOUR_DISTANCE = 80.0
UPSTREAM_CLASS_SEED = 20240611  # fixes the order of the drawn triples
MAX_UPSTREAM_CLASSES = 64


def upstream_colours() -> np.ndarray:
  return np.concatenate([PALETTE, UPSTREAM_EXTRA_COLOURS])


def is_benchmark_like(shape: str, texture: str, colour) -> bool:
  """True when the triple is (or is within the colour margin of) a
  benchmark class: the same shape, the same texture, a near colour."""
  for k in range(NUM_CLASSES):
    if (SHAPES[k % 10] == shape and TEXTURES[k // 10] == texture and
        np.linalg.norm(np.asarray(colour, np.float64) - PALETTE[k]) <
        UPSTREAM_MIN_COLOUR_DISTANCE):
      return True
  return False


@functools.lru_cache(maxsize=1)
def _upstream_triples():
  colours = upstream_colours()
  allowed = [(s, t, c) for s in range(len(UPSTREAM_SHAPES))
             for t in range(len(UPSTREAM_TEXTURES))
             for c in range(len(colours))
             if not is_benchmark_like(UPSTREAM_SHAPES[s],
                                      UPSTREAM_TEXTURES[t], colours[c])]
  order = np.random.default_rng(UPSTREAM_CLASS_SEED).permutation(len(allowed))
  return tuple(allowed[i] for i in order[:MAX_UPSTREAM_CLASSES])


def upstream_classes(num_classes: int = MAX_UPSTREAM_CLASSES):
  """The first ``num_classes`` upstream classes, as (shape, texture, colour
  index into ``upstream_colours()``) triples.

  Drawn uniformly without replacement (fixed seed) from every (shape,
  texture, colour) of the upstream grid (16 shapes x 4 textures x 32
  colours) that is not benchmark-like; a prefix of one fixed order, so a
  smaller upstream set is a subset of a larger one.
  """
  if not 1 <= num_classes <= MAX_UPSTREAM_CLASSES:
    raise ValueError(f"upstream num_classes must be in [1, "
                     f"{MAX_UPSTREAM_CLASSES}], got {num_classes}")
  return tuple((UPSTREAM_SHAPES[s], UPSTREAM_TEXTURES[t], c)
               for s, t, c in _upstream_triples()[:num_classes])


def upstream_class_names(num_classes: int = MAX_UPSTREAM_CLASSES):
  return tuple(f"{t}_{s}_c{c:02d}" for s, t, c in upstream_classes(num_classes))


@functools.lru_cache(maxsize=2)
def generate_upstream(num_images: int, seed: int, render_size: int,
                      num_classes: int):
  """Upstream images and full labels: (uint8 [N, S, S, 3], uint8 [N, K]).

  1 to 4 distinct classes per image, equally frequent, no co-occurrence
  pattern, on the benchmark's background and clutter.
  """
  classes = upstream_classes(num_classes)
  colours = upstream_colours()
  rng = np.random.default_rng(seed)
  images = np.empty((num_images, render_size, render_size, 3), np.uint8)
  labels = np.zeros((num_images, num_classes), np.uint8)
  for i in range(num_images):
    count = min(int(rng.integers(1, 5)), num_classes)
    chosen = rng.choice(num_classes, size=count, replace=False)
    labels[i, chosen] = 1
    objects = [(classes[k][0], classes[k][1], colours[classes[k][2]])
               for k in chosen]
    images[i] = _render(rng, objects, render_size)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def _split(num_images, seed, render_size, image_size, id_offset):
  images, labels = generate(num_images, seed, render_size)
  images = _resize(images, image_size)
  return Split(labels=labels,
               image_ids=np.arange(num_images, dtype=np.int64) + id_offset,
               read_images=lambda idx: images[np.asarray(idx)])


def build(cfg) -> Source:
  """The synthetic source from config.data (its `synthetic` block)."""
  s = cfg.synthetic
  train = _split(s.num_train, s.seed, s.render_size, cfg.image_size, 0)
  test = _split(s.num_test, s.seed + 1, s.render_size, cfg.image_size,
                10_000_000)
  return Source(name="synthetic", class_names=class_names(), train=train,
                test=test, info={"render_size": s.render_size})
