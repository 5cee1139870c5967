"""Tests for rebll_jax.data.augment (on-device augmentation)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageOps

from rebll_jax.data import augment


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(flip=True, cutout=0.5, randaugment_ops=2,
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
