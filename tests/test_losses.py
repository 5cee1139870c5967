"""Tests of rebll_jax.losses against plain numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from rebll_jax import losses

# (g_pos, g_neg, margin, w_pos, w_neg): BCE, ASL, AKD-cls, and a mixed one.
BCE = (0., 0., 0., 1., 1.)
ASL = (0., 4., 0.05, 1., 1.)
AKD = (1., 0., 0., 1., 1.)
SETTINGS = [BCE, ASL, AKD, (2., 1., 0.1, 0.5, 2.)]
KD_SETTINGS = [  # (temperature, beta, adaptive, student_temperature)
    (1., 0., False, 1.), (1., 1., False, 1.), (1., 2., True, 1.),
    (2., 1., True, 1.), (2., 0.5, False, 2.)]


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _np_asym_bce(z, y, mask, g_pos, g_neg, margin, w_pos, w_neg):
  """Straight transcription of METHOD.md's L_cls in float64 numpy."""
  z, y, mask = (np.asarray(a, np.float64) for a in (z, y, mask))
  p = _sigmoid(z)
  p_m = np.maximum(p - margin, 0.0)
  terms = (w_pos * y * (1 - p)**g_pos * np.log(p) +
           w_neg * (1 - y) * p_m**g_neg * np.log(1 - p_m))
  return -(mask * terms).sum(-1)


def _np_asl_reference(z, y, mask, g_pos, g_neg, clip):
  """ASL written the way its reference PyTorch code computes it."""
  z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
  xs_pos = _sigmoid(z)
  xs_neg = np.minimum(1 - xs_pos + clip, 1.0)
  loss = y * np.log(np.maximum(xs_pos, 1e-8)) + (1 - y) * np.log(
      np.maximum(xs_neg, 1e-8))
  pt = xs_pos * y + xs_neg * (1 - y)
  gamma = g_pos * y + g_neg * (1 - y)
  return -(mask * loss * (1 - pt)**gamma).sum(-1)


def _np_kd(z, z_old, mask, temperature, beta, adaptive, student_temperature):
  z, z_old, mask = (np.asarray(a, np.float64) for a in (z, z_old, mask))
  q = _sigmoid(z_old / temperature)
  p = _sigmoid(z / student_temperature)
  a = np.exp(-beta * np.abs(2 * q - 1))
  if adaptive and mask.sum() > 0:
    a = a / ((a * mask).sum() / mask.sum())
  return -(mask * a * (q * np.log(p) + (1 - q) * np.log(1 - p))).sum(-1)


def _data(seed, n=6, c=5, scale=3.0):
  rng = np.random.default_rng(seed)
  z = (rng.normal(size=(n, c)) * scale).astype(np.float32)
  z_old = (rng.normal(size=(n, c)) * scale).astype(np.float32)
  y = (rng.random((n, c)) < 0.4).astype(np.float32)
  mask = (rng.random((n, c)) < 0.7).astype(np.float32)
  return z, z_old, y, mask


def _bce(z, y, mask, s, **kw):
  g_pos, g_neg, margin, w_pos, w_neg = s
  return losses.asymmetric_bce(logits=z, labels=y, mask=mask, g_pos=g_pos,
                               g_neg=g_neg, margin=margin, w_pos=w_pos,
                               w_neg=w_neg, **kw)


def _kd(z, z_old, mask, s):
  t, beta, adaptive, ts = s
  return losses.asymmetric_distillation(
      logits=z, old_logits=z_old, mask=mask, temperature=t, beta=beta,
      adaptive=adaptive, student_temperature=ts)


@pytest.mark.parametrize("setting", SETTINGS)
def test_asymmetric_bce_matches_numpy(setting):
  for seed in range(3):
    z, _, y, mask = _data(seed)
    got = _bce(z, y, mask, setting)
    assert got.shape == (z.shape[0],) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _np_asym_bce(z, y, mask, *setting),
                               rtol=1e-5, atol=1e-5)


def test_bce_setting_equals_optax_bce():
  z, _, y, mask = _data(7)
  want = (optax.sigmoid_binary_cross_entropy(z, y) * mask).sum(-1)
  np.testing.assert_allclose(_bce(z, y, mask, BCE), want, rtol=1e-5,
                             atol=1e-6)


def test_asl_setting_equals_asl_reference_code():
  z, _, y, mask = _data(8)
  np.testing.assert_allclose(_bce(z, y, mask, ASL),
                             _np_asl_reference(z, y, mask, 0., 4., 0.05),
                             rtol=1e-5, atol=1e-6)


def test_bool_mask_and_traced_knobs():
  z, _, y, mask = _data(9)
  want = _np_asym_bce(z, y, mask, *ASL)
  np.testing.assert_allclose(_bce(z, y, mask.astype(bool), ASL), want,
                             rtol=1e-5, atol=1e-5)
  # Knobs passed as traced scalars (e.g. a method table in one executable).
  f = jax.jit(lambda z, gp, gn, m: losses.asymmetric_bce(
      logits=z, labels=y, mask=mask, g_pos=gp, g_neg=gn, margin=m))
  for s in SETTINGS[:3]:
    np.testing.assert_allclose(f(z, s[0], s[1], s[2]),
                               _np_asym_bce(z, y, mask, *s[:3], 1., 1.),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("setting", KD_SETTINGS)
def test_distillation_matches_numpy(setting):
  for seed in range(3):
    z, z_old, _, mask = _data(seed)
    mask[0] = 0.0  # a whole row out (e.g. an image without old classes)
    got = _kd(z, z_old, mask, setting)
    assert got.shape == (z.shape[0],)
    np.testing.assert_allclose(got, _np_kd(z, z_old, mask, *setting),
                               rtol=1e-5, atol=1e-5)
    assert got[0] == 0.0


def test_plain_distillation_is_soft_label_bce():
  z, z_old, _, mask = _data(3)
  q = jax.nn.sigmoid(z_old)
  for adaptive in (False, True):
    np.testing.assert_allclose(
        _kd(z, z_old, mask, (1., 0., adaptive, 1.)),
        _bce(z, q, mask, BCE), rtol=1e-5, atol=1e-6)


def test_adaptive_weights_mean_one_and_decay():
  _, z_old, _, mask = _data(4)
  a = losses.distillation_weights(old_logits=z_old, mask=mask, beta=2.,
                                  adaptive=True)
  np.testing.assert_allclose((a * mask).sum() / mask.sum(), 1.0, rtol=1e-5)
  # Confident old predictions weigh less.
  q = _sigmoid(z_old.astype(np.float64))
  conf = np.abs(2 * q - 1).ravel()
  order = np.argsort(conf)
  assert np.all(np.diff(np.asarray(a).ravel()[order]) <= 1e-6)
  # No selected entry: left unnormalised and finite.
  a0 = losses.distillation_weights(old_logits=z_old, mask=np.zeros_like(mask),
                                   beta=2., adaptive=True)
  assert np.all(np.isfinite(a0))


def _grad_fns():
  """(name, f(z) -> scalar) pairs over the losses, on fixed other inputs."""
  _, z_old, y, mask = _data(11)
  fns = [(f"bce{s}", lambda z, s=s: _bce(z, y, mask, s).mean())
         for s in SETTINGS]
  fns += [(f"kd{s}", lambda z, s=s: _kd(z, z_old, mask, s).mean())
          for s in KD_SETTINGS]
  return fns


def test_check_grads_where_fully_differentiable():
  # check_grads differentiates everything numerically, so use settings whose
  # stop_gradient weights are constants: g = 0 (margin still in play), beta=0.
  with jax.enable_x64(True):
    z, z_old, y, mask = (a.astype(np.float64) for a in _data(12))
    for s in [BCE, (0., 0., 0.05, 0.5, 2.)]:
      check_grads(lambda z, s=s: _bce(z, y, mask, s), (z,), order=2,
                  modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)
    for s in [(1., 0., False, 1.), (2., 0., True, 2.)]:
      check_grads(lambda z, s=s: _kd(z, z_old, mask, s), (z,), order=2,
                  modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)
      # and the old model gets no gradient at all
      g = jax.grad(lambda zo, s=s: _kd(z, zo, mask, s).sum())(z_old)
      assert np.all(np.asarray(g) == 0)


def test_grads_treat_focusing_weights_as_constants():
  # Finite differences of the loss with the focusing weights frozen at the
  # base point must equal autodiff (which stops their gradient).
  with jax.enable_x64(True):
    z, z_old, y, mask = (a.astype(np.float64) for a in _data(13))
    eps = 1e-6
    for s in SETTINGS:
      g_pos, g_neg, m, w_pos, w_neg = s
      p0 = _sigmoid(z)
      fp, fn = (1 - p0)**g_pos, np.maximum(p0 - m, 0)**g_neg

      def frozen(zz, fp=fp, fn=fn, m=m, w_pos=w_pos, w_neg=w_neg):
        p = _sigmoid(zz)
        p_m = np.maximum(p - m, 0.0)
        return -(mask * (w_pos * y * fp * np.log(p) + w_neg * (1 - y) * fn *
                         np.log(1 - p_m))).sum()

      num = np.zeros_like(z)
      for idx in np.ndindex(*z.shape):
        d = np.zeros_like(z)
        d[idx] = eps
        num[idx] = (frozen(z + d) - frozen(z - d)) / (2 * eps)
      got = jax.grad(lambda zz, s=s: _bce(zz, y, mask, s).sum())(z)
      np.testing.assert_allclose(got, num, rtol=1e-5, atol=1e-7)

    for s in KD_SETTINGS:
      t, beta, adaptive, ts = s
      a = np.asarray(losses.distillation_weights(
          old_logits=z_old, mask=mask, temperature=t, beta=beta,
          adaptive=adaptive))
      q = _sigmoid(z_old / t)
      # d/dz of -a [q log p + (1-q) log(1-p)], p = sigmoid(z/ts)
      want = mask * a * (_sigmoid(z / ts) - q) / ts
      got = jax.grad(lambda zz, s=s: _kd(zz, z_old, mask, s).sum())(z)
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("setting", SETTINGS)
def test_masked_equals_sliced(setting):
  z, z_old, y, known = _data(14, n=5, c=8)
  cols = np.array([1, 2, 5, 6])
  col_mask = np.zeros(8, np.float32)
  col_mask[cols] = 1
  got = _bce(z, y, known * col_mask, setting)
  want = _bce(z[:, cols], y[:, cols], known[:, cols], setting)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  for s in KD_SETTINGS:
    got = _kd(z, z_old, np.broadcast_to(col_mask, z.shape), s)
    want = _kd(z[:, cols], z_old[:, cols], np.ones((5, 4), np.float32), s)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("setting", SETTINGS)
def test_padding_classes_change_nothing(setting):
  z, z_old, y, mask = _data(15)
  n, c = z.shape
  rng = np.random.default_rng(0)
  pad = lambda a, fill: np.concatenate([a, fill], axis=1)
  garbage = rng.choice([-1e4, 1e4, 37.0], size=(n, 3)).astype(np.float32)
  zp, zop = pad(z, garbage), pad(z_old, garbage[:, ::-1])
  yp = pad(y, rng.integers(0, 2, (n, 3)).astype(np.float32))
  mp = pad(mask, np.zeros((n, 3), np.float32))

  def both(z, zo, y, m):
    return (_bce(z, y, m, setting).sum() +
            _kd(z, zo, m, (1., 1., True, 1.)).sum())

  np.testing.assert_allclose(both(zp, zop, yp, mp), both(z, z_old, y, mask),
                             rtol=1e-6)
  gp = jax.grad(both)(zp, zop, yp, mp)
  g = jax.grad(both)(z, z_old, y, mask)
  np.testing.assert_allclose(gp[:, :c], g, rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(gp[:, c:]) == 0)


def test_extreme_logits_finite():
  big = np.array([[1e4, -1e4, 1e4, -1e4, 0.0]], np.float32)
  z = np.concatenate([big, -big])
  y = np.array([[1, 1, 0, 0, 1], [1, 1, 0, 0, 0]], np.float32)
  mask = np.ones_like(z)
  for s in SETTINGS:
    val, grad = jax.value_and_grad(lambda z, s=s: _bce(z, y, mask, s).sum())(z)
    assert np.isfinite(val) and np.all(np.isfinite(grad)), s
  for s in KD_SETTINGS:
    val, grad = jax.value_and_grad(
        lambda z, s=s: _kd(z, -z[::-1], mask, s).sum())(z)
    assert np.isfinite(val) and np.all(np.isfinite(grad)), s
  # The values themselves are right, not only finite: a confidently wrong
  # entry costs |z| under BCE, log(1/m) (x its focus weight) under ASL.
  one = lambda zz, yy, s: float(_bce(np.array([[zz]], np.float32),
                                     np.array([[yy]], np.float32),
                                     np.ones((1, 1)), s)[0])
  np.testing.assert_allclose(one(1e4, 0., BCE), 1e4, rtol=1e-6)
  np.testing.assert_allclose(one(-1e4, 1., BCE), 1e4, rtol=1e-6)
  np.testing.assert_allclose(one(1e4, 0., ASL), -0.95**4 * np.log(0.05),
                             rtol=1e-5)
  np.testing.assert_allclose(one(-1e4, 1., AKD), 1e4, rtol=1e-6)
  assert one(1e4, 1., AKD) == 0.0 and one(-1e4, 0., ASL) == 0.0


def test_jit_equals_no_jit():
  z, z_old, y, mask = _data(16)
  for s in SETTINGS:
    f = lambda z, s=s: _bce(z, y, mask, s)
    np.testing.assert_allclose(jax.jit(f)(z), f(z), rtol=1e-6, atol=1e-6)
  for s in KD_SETTINGS:
    f = lambda z, zo, m, s=s: _kd(z, zo, m, s)
    np.testing.assert_allclose(jax.jit(f)(z, z_old, mask), f(z, z_old, mask),
                               rtol=1e-6, atol=1e-6)


def test_bfloat16_logits_computed_in_float32():
  z, _, y, mask = _data(17)
  got = _bce(jnp.asarray(z, jnp.bfloat16), y, mask, AKD)
  assert got.dtype == jnp.float32
  want = _np_asym_bce(np.asarray(jnp.asarray(z, jnp.bfloat16), np.float32), y,
                      mask, *AKD)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------- the baseline trainer's terms ---
# The PyTorch baseline trainer (KRT code, MultiLabelIncremental_baseline.py)
# sums ASL (gamma- 4, gamma+ 0, clip 0.05, eps 1e-8, focusing weights without
# gradient) over batch and classes, and adds lambda_f * sqrt(n_seen /
# task_size) * cosine_embedding_loss(old, new, 1) on pooled embeddings. The
# references below are written from that description in PyTorch.


def _torch():
  return pytest.importorskip("torch", reason="torch is in the test extra")


def _torch_asl_sum(torch, z, y, g_neg=4., g_pos=0., clip=0.05, eps=1e-8):
  """ASL summed over batch and classes, as described; z requires grad."""
  p = torch.sigmoid(z)
  p_neg = (1 - p + clip).clamp(max=1) if clip > 0 else 1 - p
  loss = (y * torch.log(p.clamp(min=eps)) +
          (1 - y) * torch.log(p_neg.clamp(min=eps)))
  with torch.no_grad():
    pt = p * y + p_neg * (1 - y)
    w = torch.pow(1 - pt, g_pos * y + g_neg * (1 - y))
  return -(loss * w).sum()


def _asl_inputs(seed, n=6, seen=7, total=10):
  z, _, y, _ = _data(seed, n=n, c=total, scale=4.0)
  # Saturated entries on both sides: a positive far below log(eps) (the
  # floor binds) and a confident negative (the clip binds).
  z[0, 0], y[0, 0] = -30.0, 1.0
  z[1, 1], y[1, 1] = 25.0, 0.0
  columns = np.zeros((total,), np.float32)
  columns[:seen] = 1  # the seen columns; the rest is an unread future block
  return z, y, columns


@pytest.mark.parametrize("seed", [0, 1])
def test_asl_summed_matches_torch_reference_with_gradients(seed):
  torch = _torch()
  z, y, columns = _asl_inputs(seed)
  seen = int(columns.sum())
  zt = torch.tensor(z[:, :seen], dtype=torch.float64, requires_grad=True)
  want = _torch_asl_sum(torch, zt,
                        torch.tensor(y[:, :seen], dtype=torch.float64))
  want.backward()

  def ours(z):
    return losses.asymmetric_bce(
        logits=z, labels=y, mask=np.broadcast_to(columns, z.shape), g_pos=0.,
        g_neg=4., margin=0.05, prob_floor=1e-8, reduction="sum")

  value, grad = jax.value_and_grad(ours)(z)
  assert value.shape == () and value.dtype == jnp.float32
  np.testing.assert_allclose(value, want.item(), rtol=1e-5)
  np.testing.assert_allclose(grad[:, :seen], zt.grad.numpy(), rtol=1e-5,
                             atol=1e-6)
  assert np.all(np.asarray(grad[:, seen:]) == 0)
  # The floored positive: capped at -log(eps), no gradient past it.
  assert grad[0, 0] == 0.0 and zt.grad[0, 0].item() == 0.0
  # The same in float64 (x64): agreement to float64 round-off.
  with jax.enable_x64(True):
    v64, g64 = jax.value_and_grad(ours)(z.astype(np.float64))
    np.testing.assert_allclose(v64, want.item(), rtol=1e-12)
    np.testing.assert_allclose(g64[:, :seen], zt.grad.numpy(), rtol=1e-10,
                               atol=1e-12)


def test_asl_summed_equals_sum_of_per_example_and_mean_reduction():
  z, y, columns = _asl_inputs(3)
  kw = dict(logits=z, labels=y, mask=np.broadcast_to(columns, z.shape),
            g_pos=0., g_neg=4., margin=0.05)
  per_example = losses.asymmetric_bce(**kw)
  assert per_example.shape == (z.shape[0],)
  np.testing.assert_allclose(losses.asymmetric_bce(**kw, reduction="sum"),
                             np.sum(per_example), rtol=1e-6)
  np.testing.assert_allclose(losses.asymmetric_bce(**kw, reduction="mean"),
                             np.mean(per_example), rtol=1e-6)
  # Summing over the batch scales the gradient by N against the mean.
  g_sum = jax.grad(lambda z: losses.asymmetric_bce(
      **dict(kw, logits=z), reduction="sum"))(z)
  g_mean = jax.grad(lambda z: losses.asymmetric_bce(
      **dict(kw, logits=z), reduction="mean"))(z)
  np.testing.assert_allclose(g_sum, z.shape[0] * g_mean, rtol=1e-5,
                             atol=1e-7)
  with pytest.raises(ValueError, match="reduction='total'"):
    losses.asymmetric_bce(**kw, reduction="total")


def test_prob_floor_caps_the_term_and_its_gradient():
  one = lambda z, y, floor: jax.value_and_grad(
      lambda z: losses.asymmetric_bce(
          logits=z, labels=np.array([[y]], np.float32), mask=np.ones((1, 1)),
          prob_floor=floor, reduction="sum"))(np.array([[z]], np.float32))
  # A positive at z = -30: exact BCE costs 30 with slope -1; floored at eps,
  # the cost is -log(eps) = 18.42 and the slope is 0.
  v, g = one(-30.0, 1.0, 0.0)
  np.testing.assert_allclose([v, g[0, 0]], [30.0, -1.0], rtol=1e-6)
  v, g = one(-30.0, 1.0, 1e-8)
  np.testing.assert_allclose(v, -np.log(1e-8), rtol=1e-6)
  assert g[0, 0] == 0.0
  # Above the floor nothing changes (value and gradient).
  for z, y in [(-3.0, 1.0), (2.0, 0.0), (15.0, 0.0)]:
    for a, b in zip(one(z, y, 1e-8), one(z, y, 0.0)):
      np.testing.assert_allclose(a, b, rtol=1e-6)
  # A negative far above +log(1/eps) with margin 0 is floored too.
  v, g = one(30.0, 0.0, 1e-8)
  np.testing.assert_allclose(v, -np.log(1e-8), rtol=1e-6)
  assert g[0, 0] == 0.0
  # Traced floor under jit.
  f = jax.jit(lambda z, floor: losses.asymmetric_bce(
      logits=z, labels=np.ones((1, 1), np.float32), mask=np.ones((1, 1)),
      prob_floor=floor))
  np.testing.assert_allclose(f(np.full((1, 1), -30., np.float32), 1e-8),
                             [-np.log(1e-8)], rtol=1e-6)
  np.testing.assert_allclose(f(np.full((1, 1), -30., np.float32), 0.0),
                             [30.0], rtol=1e-6)


def _pod_inputs(seed, n=6, d=8):
  rng = np.random.default_rng(seed)
  new = np.abs(rng.normal(size=(n, d))).astype(np.float32)  # post-ReLU pool
  old = np.abs(rng.normal(size=(n, d))).astype(np.float32)
  old[1] = new[1] * 3.0  # same direction: cos = 1
  new[2] = 0.0  # zero embeddings: cos = 0 by the eps in the norms
  old[3] = 0.0
  new[4] = old[4] = 0.0
  return new, old


@pytest.mark.parametrize("n_seen,task_size,weight", [(20, 5, 180.),
                                                     (15, 5, 180.),
                                                     (3, 2, 0.5)])
def test_pod_flat_matches_torch_cosine_embedding_loss(n_seen, task_size,
                                                      weight):
  torch = _torch()
  new, old = _pod_inputs(n_seen)
  scale = weight * np.sqrt(n_seen / task_size)
  new_t = torch.tensor(new, requires_grad=True)
  old_t = torch.tensor(old, requires_grad=True)
  ones = torch.ones(new.shape[0])
  want = scale * torch.nn.functional.cosine_embedding_loss(old_t, new_t, ones)
  want.backward()
  per_row = torch.nn.functional.cosine_embedding_loss(
      old_t, new_t, ones, reduction="none").detach().numpy()

  kw = dict(n_seen=n_seen, task_size=task_size, weight=weight)
  got = losses.pod_flat(features=new, old_features=old, **kw)
  assert got.shape == (new.shape[0],) and got.dtype == jnp.float32
  # float32 round-off of 1 - cos is ~1e-7, times the scale.
  np.testing.assert_allclose(got, scale * per_row, rtol=1e-5,
                             atol=1e-6 * scale)
  np.testing.assert_allclose(np.asarray(got)[1:5], [0., scale, scale, scale],
                             rtol=1e-6, atol=1e-6 * scale)
  value, (g_new, g_old) = jax.value_and_grad(
      lambda a, b: losses.pod_flat(features=a, old_features=b, **kw,
                                   reduction="mean"), argnums=(0, 1))(new, old)
  np.testing.assert_allclose(value, want.item(), rtol=1e-5)
  assert np.all(np.isfinite(g_new))
  np.testing.assert_allclose(g_new, new_t.grad.numpy(), rtol=1e-4,
                             atol=1e-4 * np.abs(new_t.grad.numpy()).max())
  # The past model is a constant: no gradient (torch's would be non-zero).
  assert np.all(np.asarray(g_old) == 0)
  assert np.abs(old_t.grad.numpy()).max() > 0
  np.testing.assert_allclose(
      losses.pod_flat(features=new, old_features=old, **kw, reduction="sum"),
      np.sum(got), rtol=1e-6)


def test_pod_flat_closed_forms_traced_scale_and_dtypes():
  rng = np.random.default_rng(5)
  e = rng.normal(size=(4, 16)).astype(np.float32)
  kw = dict(n_seen=20, task_size=5, weight=180.)
  np.testing.assert_allclose(losses.pod_flat(features=e, old_features=e, **kw),
                             0.0, atol=1e-4)
  np.testing.assert_allclose(
      losses.pod_flat(features=-e, old_features=e, **kw), 2 * 180 * 2.0,
      rtol=1e-6)
  # Orthogonal pairs: 1 - cos = 1.
  a = np.eye(4, 16, dtype=np.float32)
  b = np.eye(4, 16, k=4, dtype=np.float32)
  np.testing.assert_allclose(losses.pod_flat(features=a, old_features=b, **kw),
                             360.0, rtol=1e-6)
  # n_seen, task_size and weight may be traced: one executable per shape.
  traces = []

  def f(x, y, n_seen, weight):
    traces.append(1)
    return losses.pod_flat(features=x, old_features=y, n_seen=n_seen,
                           task_size=5, weight=weight, reduction="mean")

  jf = jax.jit(f)
  new, old = _pod_inputs(7)
  base = float(jf(new, old, 10, 180.))
  np.testing.assert_allclose(float(jf(new, old, 40, 180.)), 2 * base,
                             rtol=1e-6)
  np.testing.assert_allclose(float(jf(new, old, 10, 90.)), base / 2,
                             rtol=1e-6)
  assert len(traces) == 1
  # bfloat16 features are computed in float32.
  got = losses.pod_flat(features=jnp.asarray(new, jnp.bfloat16),
                        old_features=old, **kw)
  assert got.dtype == jnp.float32
  want = losses.pod_flat(
      features=np.asarray(jnp.asarray(new, jnp.bfloat16), np.float32),
      old_features=old, **kw)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  with pytest.raises(ValueError, match="task_size=0 must be > 0"):
    losses.pod_flat(features=e, old_features=e, n_seen=2, task_size=0,
                    weight=1.)
  with pytest.raises(ValueError, match="reduction="):
    losses.pod_flat(features=e, old_features=e, **kw, reduction="avg")


def test_pod_flat_check_grads_away_from_zero_vectors():
  with jax.enable_x64(True):
    new, old = (a.astype(np.float64) for a in _pod_inputs(9))
    rows = [0, 5]  # generic rows (zero rows have a kink-free but huge slope)
    check_grads(lambda x: losses.pod_flat(
        features=x, old_features=old[rows], n_seen=6, task_size=2,
        weight=1.5), (new[rows],), order=1, modes=("rev",), atol=1e-5,
        rtol=1e-5)


def test_decay_on_score_damps_confident_positives_only():
  z, z_old, _, mask = _data(5)
  q = _sigmoid(z_old.astype(np.float64))
  for adaptive in (False, True):
    a = np.asarray(losses.distillation_weights(
        old_logits=z_old, mask=mask, beta=1.5, adaptive=adaptive,
        decay_on="score"), np.float64)
    want = np.exp(-1.5 * q)
    if adaptive:
      want = want / ((want * mask).sum() / mask.sum())
    np.testing.assert_allclose(a, want, rtol=1e-5)
  # A confident negative (q ~ 0) keeps full weight, unlike the default.
  sure_no = np.full((1, 2), -8.0, np.float32)
  ones = np.ones((1, 2), np.float32)
  by_score = losses.distillation_weights(old_logits=sure_no, mask=ones,
                                         beta=2., decay_on="score")
  by_conf = losses.distillation_weights(old_logits=sure_no, mask=ones,
                                        beta=2.)
  assert float(by_score[0, 0]) > 0.99 and float(by_conf[0, 0]) < 0.14
  # The loss passes the knob through.
  kd = losses.asymmetric_distillation(logits=z, old_logits=z_old, mask=mask,
                                      beta=1.5, decay_on="score")
  p = _sigmoid(z.astype(np.float64))
  terms = np.exp(-1.5 * q) * (q * np.log(p) + (1 - q) * np.log(1 - p))
  np.testing.assert_allclose(kd, -(terms * mask).sum(1), rtol=1e-4,
                             atol=1e-5)
  with pytest.raises(ValueError, match="decay_on"):
    losses.distillation_weights(old_logits=z_old, mask=mask, decay_on="q")
