"""Tests for rebll_jax.data.augment (on-device augmentation)."""

import functools
import random

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from rebll_jax import config_base
from rebll_jax.data import augment, field_augment as fa
from rebll_jax.errors import UserError


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(policy="ours", flip=True, cutout=0.5,
                                     cutout_fill="grey", randaugment_ops=2,
                                     randaugment_magnitude=0.3))
  c.update(kw)
  return c


def _images(n=6, h=24, w=20, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), np.uint8)


@pytest.fixture(scope="module")
def jitted():
  cache = {}

  def get(**kw):
    key = tuple(sorted(kw.items()))
    if key not in cache:
      cache[key] = jax.jit(functools.partial(augment.augment_batch,
                                             cfg=_cfg(**kw)))
    return cache[key]
  return get


def test_shape_dtype_range(jitted):
  imgs = _images()
  out = jitted()(jax.random.key(0), imgs)
  assert out.shape == imgs.shape and out.dtype == jnp.float32
  out = np.asarray(out)
  assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


def test_determinism_and_keys_differ(jitted):
  imgs = _images()
  f = jitted()
  a = np.asarray(f(jax.random.key(1), imgs))
  b = np.asarray(f(jax.random.key(1), imgs))
  c = np.asarray(f(jax.random.key(2), imgs))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  # Each example has its own key: identical inputs give different outputs.
  same = np.repeat(imgs[:1], 4, axis=0)
  d = np.asarray(f(jax.random.key(3), same))
  assert not np.allclose(d[0], d[1])


def test_example_key_independent_of_batch_size(jitted):
  imgs = _images(n=6)
  f = jitted()
  full = np.asarray(f(jax.random.key(4), imgs))
  head = np.asarray(f(jax.random.key(4), imgs[:3]))
  np.testing.assert_allclose(full[:3], head, atol=1e-6)


def test_jit_equals_eager():
  imgs = _images(n=2, h=8, w=8)
  cfg = _cfg(randaugment_ops=1)
  a = augment.augment_batch(jax.random.key(5), imgs, cfg)
  b = jax.jit(functools.partial(augment.augment_batch, cfg=cfg))(
      jax.random.key(5), imgs)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_all_off_is_identity(jitted):
  imgs = _images()
  out = jitted(flip=False, cutout=0.0, randaugment_ops=0)(
      jax.random.key(0), imgs)
  np.testing.assert_allclose(np.asarray(out), imgs / 255.0, atol=1e-6)


def test_flip_only(jitted):
  imgs = _images(n=32)
  out = np.asarray(jitted(cutout=0.0, randaugment_ops=0)(
      jax.random.key(0), imgs))
  flipped = [np.allclose(o, i[:, ::-1] / 255.0, atol=1e-6) for o, i in
             zip(out, imgs)]
  kept = [np.allclose(o, i / 255.0, atol=1e-6) for o, i in zip(out, imgs)]
  assert all(f or k for f, k in zip(flipped, kept))
  assert 4 <= sum(flipped) <= 28


def test_cutout_only(jitted):
  imgs = np.full((16, 20, 20, 3), 255, np.uint8)
  out = np.asarray(jitted(flip=False, cutout=0.5, randaugment_ops=0)(
      jax.random.key(0), imgs))
  for o in out:
    grey = np.all(o == 0.5, axis=-1)
    assert set(np.unique(o)) <= {0.5, 1.0}
    assert 0 < grey.sum() <= 100  # a 10x10 square, clipped at the border
    ys, xs = np.nonzero(grey)
    assert grey[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()  # a box


def test_eval_transform_and_normalize():
  imgs = _images()
  np.testing.assert_allclose(np.asarray(augment.eval_transform(imgs)),
                             imgs / 255.0, atol=1e-6)
  n = np.asarray(augment.eval_transform(imgs, normalize_images=True))
  ref = (imgs / 255.0 - np.array(augment.IMAGENET_MEAN)) / np.array(
      augment.IMAGENET_STD)
  np.testing.assert_allclose(n, ref, atol=1e-5)
  out = jax.jit(functools.partial(augment.augment_batch, cfg=_cfg(),
                                  normalize_images=True))(
                                      jax.random.key(0), imgs)
  assert np.asarray(out).min() < 0


def _op(img_u8, name, m, sign=1.0):
  x = jnp.asarray(img_u8, jnp.float32) / 255.0
  return np.asarray(augment.apply_op_by_name(x, name, m, sign))


def test_ops_match_pil():
  img = _images(n=1, h=16, w=12, seed=3)[0]
  pil = Image.fromarray(img)
  np.testing.assert_allclose(
      _op(img, "equalize", 0.3) * 255, np.asarray(ImageOps.equalize(pil)),
      atol=0.51)
  np.testing.assert_allclose(
      _op(img, "posterize", 0.5) * 255,
      np.asarray(ImageOps.posterize(pil, 6)), atol=0.51)
  # solarize at m: invert pixels >= 1 - m, i.e. threshold 255 * (1 - m).
  sol = _op(img, "solarize", 0.5) * 255
  ref = np.where(img >= 127.5, 255 - img, img)
  np.testing.assert_allclose(sol, ref, atol=0.51)
  np.testing.assert_allclose(
      _op(img, "autocontrast", 0.3) * 255,
      np.asarray(ImageOps.autocontrast(pil)), atol=1.01)


def test_every_op_in_range_and_identity_at_zero():
  img = _images(n=1, h=16, w=16, seed=4)[0]
  for name in augment.OPS:
    for sign in (-1.0, 1.0):
      out = _op(img, name, 0.9, sign)
      assert out.shape == img.shape and 0 <= out.min() and out.max() <= 1, name
  # Magnitude 0 leaves the image unchanged for the magnitude-driven ops.
  for name in ("rotate", "color", "contrast", "brightness", "sharpness",
               "shear_x", "shear_y", "translate_x", "translate_y",
               "posterize", "identity"):
    np.testing.assert_allclose(_op(img, name, 0.0), img / 255.0, atol=1e-5,
                               err_msg=name)


def test_translate_shifts_by_integer():
  img = _images(n=1, h=20, w=20, seed=5)[0]
  # 0.45 * m * w = 9 pixels at m = 1.
  out = _op(img, "translate_x", 1.0, 1.0)
  np.testing.assert_allclose(out[:, :11], img[:, 9:] / 255.0, atol=1e-5)
  np.testing.assert_allclose(out[:, 11:], 0.5, atol=1e-6)


# ----------------------------------------------------- cutout_fill, policy
def test_cutout_random_fill_is_one_colour_per_image(jitted):
  imgs = np.full((16, 20, 20, 3), 255, np.uint8)
  out = np.asarray(jitted(flip=False, cutout=0.5, randaugment_ops=0,
                          cutout_fill="random")(jax.random.key(0), imgs))
  colours = set()
  for o in out:
    box = np.any(o != 1.0, axis=-1)
    ys, xs = np.nonzero(box)
    assert 0 < box.sum() <= 100
    assert box[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
    colour = o[ys[0], xs[0]]
    np.testing.assert_array_equal(o[box], np.broadcast_to(colour, o[box].shape))
    np.testing.assert_allclose(colour * 255, np.round(colour * 255),
                               atol=1e-4)  # one of the 256 levels
    colours.add(tuple(np.round(colour * 255).astype(int)))
  assert len(colours) > 8  # per-image colours, not one grey
  # The box itself is where the grey fill puts it (same key stream).
  grey = np.asarray(jitted(flip=False, cutout=0.5, randaugment_ops=0)(
      jax.random.key(0), imgs))
  np.testing.assert_array_equal(np.any(grey != 1.0, axis=-1),
                                np.any(out != 1.0, axis=-1))


def test_field_policy_leaves_only_the_eval_conversion(jitted):
  imgs = _images()
  out = jitted(policy="field", flip=True, cutout=0.5)(jax.random.key(0), imgs)
  # Exactly the eval conversion (XLA may turn / 255 into a multiply: 1 ulp).
  np.testing.assert_allclose(np.asarray(out), imgs / 255.0, rtol=0,
                             atol=1.2e-7)


def test_unknown_policy_or_fill_is_a_user_error():
  with pytest.raises(UserError, match="augment.policy"):
    augment.augment_batch(jax.random.key(0), _images(n=1), _cfg(policy="x"))
  with pytest.raises(UserError, match="augment.cutout_fill"):
    augment.augment_batch(jax.random.key(0), _images(n=1),
                          _cfg(cutout_fill="pink"))


# ------------------------------------- field policy against `randaugment`
@pytest.fixture(scope="module")
def ra_package():
  """(the package's module, its RandAugment()); the package uses np.int,
  gone from numpy >= 1.24, so it is put back while these tests run."""
  had = hasattr(np, "int")
  np.int = int
  package = pytest.importorskip(
      "randaugment.randaugment",
      reason="the reference is the PyPI package randaugment==1.0.2 (in the "
      "`test` extra)")
  yield package, package.RandAugment()
  if not had:
    del np.int


def _field_image(size=20, seed=0):
  x = np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)
  x[:4, :6] = (30, 200, 90)  # a flat patch: equalize / contrast corner cases
  return x


def test_field_table_and_magnitudes_are_the_package_ones(ra_package):
  package, policy = ra_package
  ours = [list(fa.sub_policy(i)) for i in range(fa.NUM_POLICIES)]
  assert ours == [list(p) for p in policy.get_rand_policies()]
  assert list(fa.OPS) == package.RandAugment.get_trans_list()
  for op in fa.OPS:
    for level in range(10):
      if op == "Cutout" and level == 0:
        continue
      ref = package.SubPolicy(0.5, op, level, 0.5, op, level).magnitude1
      assert fa.magnitude(op, level) == ref, (op, level)


def test_field_ops_equal_the_package_ops(ra_package):
  package, _ = ra_package
  for size, seed in ((20, 1), (17, 2)):
    x = _field_image(size, seed)
    for op in fa.OPS:
      for level in fa.LEVELS:
        sp = package.SubPolicy(1.0, op, level, 0.0, op, level)
        for draw_seed in range(2):
          random.seed(draw_seed)
          np.random.seed(draw_seed)
          ref = np.asarray(sp.operation1(Image.fromarray(x), sp.magnitude1))
          random.seed(draw_seed)  # replay the op's own draws
          np.random.seed(draw_seed)
          sign = random.choice([-1, 1]) if op in fa.SIGNED else 1
          centre = ((np.random.randint(0, size), np.random.randint(0, size))
                    if op == "Cutout" else (0, 0))
          out = fa.apply_op(x, op, level, sign, centre)
          # Exact: both sides run PIL's integer code or the same LUT.
          np.testing.assert_array_equal(out, ref, err_msg=f"{op} {level}")


def test_field_randaugment_equals_the_package_under_its_draws(ra_package):
  _, policy = ra_package
  policies = policy._policies  # pylint: disable=protected-access
  x = _field_image(16, 3)
  used = set()
  for seed in range(300):
    random.seed(seed)
    np.random.seed(seed)
    ref = np.asarray(policy(Image.fromarray(x)))
    # Replay the package's calls in its order: the sub-policy, then per op
    # its coin, and if applied its sign (random) or its centre (np.random).
    random.seed(seed)
    np.random.seed(seed)
    index = random.randint(0, len(policies) - 1)
    applied, signs, centres = [], [], []
    for _, op, _ in policies[index]:
      applied.append(random.random() < 0.5)
      signs.append(random.choice([-1, 1]) if applied[-1] and op in fa.SIGNED
                   else 1)
      centres.append((np.random.randint(0, 16), np.random.randint(0, 16))
                     if applied[-1] and op == "Cutout" else (0, 0))
      if applied[-1]:
        used.add(op)
    draws = fa.Draws(flip=False, cutout_centre=(0, 0), cutout_colour=(0, 0, 0),
                     policy=index, applied=tuple(applied), signs=tuple(signs),
                     op_centres=tuple(centres))
    np.testing.assert_array_equal(fa.randaugment(x, draws), ref,
                                  err_msg=f"seed {seed}")
  assert used == set(fa.OPS)


def _reference_cutout_pil(x, fraction, cy, cx, colour):
  """CutoutPIL as the baseline draws it, for square images: PIL's
  rectangle with both corners included, corners clipped to [0, size]."""
  img = Image.fromarray(x)
  size = x.shape[0]
  half = int(fraction * size + 0.5) // 2
  y0, y1 = np.clip([cy - half, cy + half], 0, size)
  x0, x1 = np.clip([cx - half, cx + half], 0, size)
  ImageDraw.Draw(img).rectangle([int(x0), int(y0), int(x1), int(y1)],
                                fill=tuple(colour))
  return np.asarray(img)


def test_field_cutout_equals_pil_rectangle():
  for size in (16, 17):
    x = _field_image(size, 4)
    for fraction in (0.5, 0.3):
      for cy, cx in ((0, 0), (size - 1, 3), (7, size - 1), (8, 8)):
        colour = (cy * 9 % 256, 17, cx * 5 % 256)
        np.testing.assert_array_equal(
            fa.cutout_pil(x, fraction, (cy, cx), colour),
            _reference_cutout_pil(x, fraction, cy, cx, colour))
  # 0.5 of 64 px: a 33 x 33 square away from the borders.
  out = fa.cutout_pil(np.zeros((64, 64, 3), np.uint8), 0.5, (30, 30),
                      (1, 2, 3))
  assert (out[..., 0] == 1).sum() == 33 * 33


def test_host_augment_is_a_function_of_seed_task_step_row():
  images = np.stack([_field_image(16, s) for s in range(6)])
  aug = fa.HostAugment()  # the baseline's: no flip, cutout 0.5, random fill
  rows = np.arange(6)
  a = aug(images, seed=1, task=2, step=3, rows=rows)
  np.testing.assert_array_equal(a, aug(images, seed=1, task=2, step=3,
                                       rows=rows))
  assert a.dtype == np.uint8 and a.shape == images.shape
  assert all(not np.array_equal(a[i], images[i]) for i in range(6))
  for other in (dict(seed=2, task=2, step=3), dict(seed=1, task=3, step=3),
                dict(seed=1, task=2, step=4)):
    b = aug(images, rows=rows, **other)
    assert not np.array_equal(a, b), other
  # Each row's draws depend on its global row only: a host's slice of the
  # batch equals the same rows of the whole batch; threads change nothing.
  half = aug(images[3:], seed=1, task=2, step=3, rows=rows[3:])
  np.testing.assert_array_equal(half, a[3:])
  threaded = fa.HostAugment(workers=2)(images, seed=1, task=2, step=3,
                                       rows=rows)
  np.testing.assert_array_equal(threaded, a)
  # One image, one draw, replayed by hand: flip, grey cutout, sub-policy.
  stream = fa._STREAM  # pylint: disable=protected-access
  rng = np.random.default_rng([1, 2, 3, 4, stream])
  draws = fa.draw(rng, 16, 16)
  flipped = images[4][:, ::-1] if draws.flip else images[4]
  ref = fa.randaugment(fa.cutout_pil(flipped, 0.25, draws.cutout_centre,
                                     fa.GREY_FILL), draws)
  got = fa.HostAugment(flip=True, cutout=0.25, cutout_fill="grey")(
      images[4:5], seed=1, task=2, step=3, rows=np.array([4]))
  np.testing.assert_array_equal(got[0], ref)


def test_host_augment_from_config():
  cfg = config_base.base_config().augment
  assert cfg.policy == "ours" and cfg.cutout_fill == "grey"
  assert fa.from_config(cfg) is None
  cfg.update(dict(policy="field", flip=False, cutout=0.5,
                  cutout_fill="random"))
  assert fa.from_config(cfg, workers=3) == fa.HostAugment(
      flip=False, cutout=0.5, cutout_fill="random", workers=3)
  with pytest.raises(UserError, match="cutout_fill"):
    fa.HostAugment(cutout_fill="pink")
