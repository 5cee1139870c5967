"""Tests for rebll_jax.optim against torch's Adam driven by OneCycleLR."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rebll_jax import config_base, optim
from rebll_jax.errors import UserError


def _torch():
  # The reference; in the `test` extra (CPU wheel).
  return pytest.importorskip(
      "torch", reason="the reference optimizer and schedule are torch's")


def _cfg(**kw):
  c = config_base.base_config().optim
  c.update(kw)
  return c


def _torch_schedule(total, pct, peak=1e-3, cycle=True):
  """(lr, beta1) of every step as torch's training loop sees them."""
  torch = _torch()
  p = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.Adam([p], lr=peak)
  sched = torch.optim.lr_scheduler.OneCycleLR(
      opt, max_lr=peak, total_steps=total, pct_start=pct,
      cycle_momentum=cycle)
  lrs, b1s = [], []
  for _ in range(total):
    lrs.append(opt.param_groups[0]["lr"])
    b1s.append(opt.param_groups[0]["betas"][0])
    opt.step()
    sched.step()
  return np.array(lrs), np.array(b1s)


@jax.jit
def _schedules(total, pct):
  steps = jnp.arange(256)  # one shape for every total: one compilation
  return (optim.learning_rate(steps, total_steps=total, peak=3e-3,
                              warmup_frac=pct, schedule="one_cycle"),
          optim.beta1(steps, total_steps=total, warmup_frac=pct))


@pytest.mark.parametrize("pct", [0.2, 0.3])
def test_one_cycle_lr_and_beta1_match_torch_every_step(pct):
  peak = 3e-3
  # Totals where pct * total - 1 is negative, fractional and integral.
  for total in (1, 2, 3, 4, 7, 10, 11, 37, 100, 251):
    if pct * total == 1.0:
      continue  # torch divides 0 by 0 there (checked below)
    ref_lr, ref_b1 = _torch_schedule(total, pct, peak)
    lr, b1 = (np.asarray(a)[:total] for a in _schedules(total, pct))
    # float32 vs torch's float64: relative 1e-5, and 1e-7 * peak absolute
    # for the tail where the rate is ~1e-6 of its peak.
    np.testing.assert_allclose(lr, ref_lr, rtol=1e-5, atol=1e-7 * peak,
                               err_msg=f"total={total}")
    np.testing.assert_allclose(b1, ref_b1, rtol=0, atol=1e-6,
                               err_msg=f"total={total}")


def test_one_cycle_closed_form_points():
  # T = 10, p = 0.2: peak at step p*T - 1 = 1, minimum at the last step.
  lr = np.asarray(optim.learning_rate(jnp.arange(10), total_steps=10,
                                      peak=1.0, warmup_frac=0.2,
                                      schedule="one_cycle"))
  np.testing.assert_allclose(lr[[0, 1, 9]], [1 / 25, 1.0, 1 / 25 / 1e4],
                             rtol=1e-6)
  b1 = np.asarray(optim.beta1(jnp.arange(10), total_steps=10,
                              warmup_frac=0.2))
  np.testing.assert_allclose(b1[[0, 1, 9]], [0.95, 0.85, 0.95], atol=1e-7)
  # p * T == 1: torch raises (0 / 0); ours starts at the peak.
  lr5 = optim.learning_rate(0, total_steps=5, peak=1.0, warmup_frac=0.2,
                            schedule="one_cycle")
  np.testing.assert_allclose(float(lr5), 1.0, rtol=1e-6)
  with pytest.raises(ZeroDivisionError):
    _torch_schedule(5, 0.2)


def _problem():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 3)).astype(np.float32)
  y = np.sign(rng.normal(size=(16, 4))).astype(np.float32)
  w = rng.normal(size=(3, 4)).astype(np.float32) * 0.5
  b = rng.normal(size=(4,)).astype(np.float32) * 0.5
  return x, y, w, b


def _torch_run(total, peak, wd, cycle):
  torch = _torch()
  x, y, w, b = map(torch.from_numpy, _problem())
  w, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
  # The baseline's parameter groups: L2 on weights, none on biases.
  opt = torch.optim.Adam([{"params": [b], "weight_decay": 0.0},
                          {"params": [w], "weight_decay": wd}], lr=peak)
  sched = torch.optim.lr_scheduler.OneCycleLR(
      opt, max_lr=peak, total_steps=total, pct_start=0.2,
      cycle_momentum=cycle)
  history = []
  for _ in range(total):
    loss = torch.nn.functional.softplus(-y * (x @ w + b)).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    history.append((w.detach().numpy().copy(), b.detach().numpy().copy()))
  return history


def _jax_run(total, peak, wd, cycle):
  x, y, w, b = _problem()
  cfg = _cfg(weight_decay=wd, cycle_beta1=cycle)
  tx = optim.make_transform(cfg)
  params = {"dense": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}
  state = tx.init(params)

  def loss_fn(p):
    logits = x @ p["dense"]["kernel"] + p["dense"]["bias"]
    return jnp.mean(jax.nn.softplus(-y * logits))

  @jax.jit
  def step(params, state, i):
    grads = jax.grad(loss_fn)(params)
    updates, state, lr = optim.step_updates(
        tx, grads, state, params, task_step=i, total_steps=jnp.int32(total),
        lr_peak=jnp.float32(peak), cfg=cfg)
    return optax.apply_updates(params, updates), state, lr

  history = []
  for i in range(total):
    params, state, _ = step(params, state, jnp.int32(i))
    history.append((np.asarray(params["dense"]["kernel"]),
                    np.asarray(params["dense"]["bias"])))
  return history


@pytest.mark.parametrize("cycle", [True, False])
def test_parameters_match_torch_adam_under_one_cycle(cycle):
  total, peak, wd = 20, 0.05, 0.05
  ref = _torch_run(total, peak, wd, cycle)
  ours = _jax_run(total, peak, wd, cycle)
  for i, ((w_ref, b_ref), (w, b)) in enumerate(zip(ref, ours)):
    # optax takes Adam's bias corrections in float32 (1 - 0.999**t loses
    # ~1e-5 of itself), torch in float64: each update differs by ~7e-6
    # relative, the parameters (scale 0.5, moved by ~0.4) by <= 3.2e-6 after
    # 20 steps (measured). A 0.9-vs-cycled beta1 moves them by > 1e-3.
    np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-5,
                               err_msg=f"step {i}")
    np.testing.assert_allclose(b, b_ref, rtol=0, atol=1e-5,
                               err_msg=f"step {i}")
  if cycle:  # the schedule is what the comparison can tell apart
    other = _torch_run(total, peak, wd, cycle=False)
    assert np.abs(other[-1][0] - ours[-1][0]).max() > 1e-3


def test_beta1_argument_adam_matches_optax_adam_at_constant_beta1():
  rng = np.random.default_rng(1)
  params = {"a": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}
  ours, ref = optim.scale_by_adam_beta1_arg(), optax.scale_by_adam(b1=0.9)
  s_ours, s_ref = ours.init(params), ref.init(params)
  assert (jax.tree.structure(s_ours) == jax.tree.structure(s_ref))
  update_ours = jax.jit(lambda g, s: ours.update(g, s, beta1=jnp.float32(0.9)))
  update_ref = jax.jit(ref.update)
  for step in range(3):
    g = jax.tree.map(lambda p: p * (step + 1.5) - 0.3, params)
    u_ours, s_ours = update_ours(g, s_ours)
    u_ref, s_ref = update_ref(g, s_ref)
    # optax takes 1 - b1 in float64 (b1 a Python float), ours in float32
    # (b1 an array): 2.4e-7 relative, nothing more.
    for a, b in zip(jax.tree.leaves((u_ours, s_ours)),
                    jax.tree.leaves((u_ref, s_ref))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                                 atol=0)


def test_cycle_beta1_config_errors():
  with pytest.raises(UserError, match="cycle_beta1"):
    optim.make_transform(_cfg(cycle_beta1=True, name="sgd"))
  with pytest.raises(UserError, match="cycle_beta1"):
    optim.make_transform(_cfg(cycle_beta1=True, schedule="cosine"))
  # The cycled transform cannot silently run without its beta1.
  tx = optim.make_transform(_cfg(cycle_beta1=True))
  params = {"k": jnp.ones((2, 2))}
  with pytest.raises(TypeError):
    tx.update(params, tx.init(params), params)
