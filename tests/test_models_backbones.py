"""Backbones: parity with the PyTorch reference models, dtypes, registry.

Parity: random PyTorch weights with perturbed norm statistics and affine
parameters, converted by ``convert_state_dict``, must give the PyTorch
logits and features within 1e-4 relative error (max|ours - ref| / max|ref|)
in float32, at 224, at 64 and at an odd size. One jit per arch and size,
batch 1, to keep the suite fast.
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rebll_jax.models import build_model, pretrained, tresnet
from rebll_jax import config_base

ARCHS = ["resnet18", "resnet50", "resnet101", "tresnet_m"]
# Odd feature maps: TResNet sides must be multiples of 4 (68x100 runs
# 17x25 -> 9x13 -> 5x7 -> 3x4 through the blur and ceil-mode pools);
# ResNets take any size.
ODD = {"tresnet_m": (68, 100)}
PARITY_TOL = 1e-4
BF16_TOL = 5e-2  # relative, bfloat16 compute vs float32, same weights
# bfloat16 on one arch per block family (resnet18/101 repeat these blocks);
# it costs a compile each.
BF16_ARCHS = ("resnet50", "tresnet_m")
# resnet101 is resnet50's blocks, more of them: one (odd) size checks its
# names and depth; the sizes' padding paths are resnet50's (one compile of
# the deep net instead of three).
SIZES = {"resnet101": [(67, 99)]}


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return np.abs(ours - ref).max() / np.abs(ref).max()


def reference_model(arch, num_classes=10, seed=0):
  torch = pytest.importorskip(
      "torch", reason="parity tests need torch (the 'test' extra)")
  from experiments.torch_baseline import models  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)  # xdist workers share few cores
  torch.manual_seed(seed)
  model = models.MODELS[arch](num_classes=num_classes).eval()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        # Away from the identity (and from timm's zero-initialised residual
        # norms), so that every norm parameter is exercised.
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.2)
        m.running_mean.normal_(0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
  return model


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_with_pytorch(arch):
  torch = pytest.importorskip(
      "torch", reason="parity tests need torch (the 'test' extra)")
  start = time.time()
  ref = reference_model(arch)
  variables, report = pretrained.convert_state_dict(
      arch, ref.state_dict(), keep_head=True)
  assert report["format"] in ("timm", "torchvision/timm")
  module = pretrained.build(arch, 10)
  apply = jax.jit(lambda v, x: module.apply(v, x, train=False))
  rng = np.random.RandomState(0)
  for size in SIZES.get(arch, [(224, 224), (64, 64), ODD.get(arch, (67, 99))]):
    x = rng.rand(1, *size, 3).astype(np.float32)
    with torch.no_grad():
      want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    got = apply(variables, x)
    for key in ("logits", "features"):
      assert got[key].dtype == jnp.float32
      assert got[key].shape == tuple(want[key].shape)
      err = rel_err(got[key], want[key].numpy())
      assert err < PARITY_TOL, (arch, size, key, err)
  if arch not in BF16_ARCHS:
    return
  # Mixed precision: same converted weights, bfloat16 compute, float32 out.
  x = rng.rand(1, 64, 64, 3).astype(np.float32)
  want = apply(variables, x)
  half = pretrained.build(arch, 10, jnp.bfloat16)
  got = jax.jit(lambda v, x: half.apply(v, x, train=False))(variables, x)
  for key in ("logits", "features"):
    assert got[key].dtype == jnp.float32
    assert rel_err(got[key], want[key]) < BF16_TOL, (arch, key)
  print(f"{arch}: {time.time() - start:.1f}s")


def test_registry_builds_every_arch_with_contract_shapes():
  cfg = config_base.base_config()
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  dims = {"resnet18": 512, "resnet50": 2048, "resnet101": 2048,
          "tresnet_m": 2048}
  for arch in ARCHS:
    cfg.model.arch = arch
    cfg.model.dtype = "bfloat16"
    model = build_model(cfg.model, num_classes=7)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    params = jax.tree.leaves(variables["params"])
    assert all(p.dtype == jnp.float32 for p in params), arch
    out = jax.eval_shape(model.apply, variables, x)
    assert out["logits"].shape == (2, 7) and out["logits"].dtype == jnp.float32
    assert out["features"].shape == (2, dims[arch])
    assert out["features"].dtype == jnp.float32


def test_tresnet_blocks_zero_init_residual_norm_and_train_batch_stats():
  # Narrow blocks (initialising full TResNet-M costs seconds of RNG compile).
  x = np.random.RandomState(0).rand(2, 8, 8, 16).astype(np.float32)
  for block, last in ((tresnet.BasicBlock(16, stride=2), "conv2"),
                      (tresnet.Bottleneck(8, stride=2), "conv3")):
    variables = jax.jit(lambda k, x: block.init(k, x, train=False))(
        jax.random.PRNGKey(0), x)
    params = variables["params"]
    assert not np.any(params[last]["bn"]["scale"])
    assert np.all(params["conv1"]["bn"]["scale"] == 1)
    # A zero residual branch: the block is relu(shortcut).
    y = jax.jit(lambda v, x: block.apply(v, x, train=False))(variables, x)
    sub = {c: variables[c]["downsample"] for c in variables}
    short = jax.jit(lambda v, x: tresnet.Shortcut(y.shape[-1], True).apply(
        v, x, False))(sub, x)
    np.testing.assert_allclose(y, nn.relu(short), rtol=1e-6, atol=1e-6)
    # Train mode normalises with batch statistics and updates running ones.
    _, updates = jax.jit(lambda v, x: block.apply(
        v, x, train=True, mutable=["batch_stats"]))(variables, x)
    assert not np.allclose(variables["batch_stats"]["conv1"]["bn"]["mean"],
                           updates["batch_stats"]["conv1"]["bn"]["mean"])


def test_param_counts_and_macs_match_published():
  from experiments import model_stats  # pylint: disable=g-import-not-at-top
  for arch, (params_m, gmacs) in model_stats.PUBLISHED.items():
    s = model_stats.stats(arch, 224, 1000)
    assert abs(s["params"] / 1e6 - params_m) < 0.05, (arch, s)
    assert abs(s["macs"] / 1e9 / gmacs - 1) < 0.01, (arch, s)


def test_tresnet_rejects_sides_not_multiple_of_4():
  model = pretrained.build("tresnet_m", 3)
  with pytest.raises(ValueError, match="divisible by 4"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0),
                   jax.ShapeDtypeStruct((1, 30, 32, 3), jnp.float32))


def test_blur_and_space_to_depth_closed_form():
  # space-to-depth: channel (dy*4 + dx)*C + c.
  x = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
  y = np.asarray(tresnet.space_to_depth(jnp.asarray(x)))
  assert y.shape == (2, 2, 2, 48)
  for dy, dx, c in [(0, 0, 0), (1, 3, 2), (3, 2, 1)]:
    np.testing.assert_array_equal(y[:, 1, 0, (dy * 4 + dx) * 3 + c],
                                  x[:, 4 + dy, dx, c])
  # blur of a constant map is the constant, at odd and even sides.
  for side in (5, 6):
    ones = jnp.ones((1, side, side, 2))
    out = tresnet.blur_downsample(ones)
    assert out.shape == (1, (side + 1) // 2, (side + 1) // 2, 2)
    np.testing.assert_allclose(out, 1.0, rtol=1e-6)
  # An impulse at (1, 1) of a 5x5 map: output i averages input rows
  # 2i-1..2i+1 with weights 1/4, 1/2, 1/4, and the reflect padding counts
  # row 1 twice for output 0 (1/4 + 1/4), once for output 1 (1/4).
  imp = jnp.zeros((1, 5, 5, 1)).at[0, 1, 1, 0].set(1.0)
  per_axis = np.array([0.5, 0.25, 0.0])
  np.testing.assert_allclose(tresnet.blur_downsample(imp)[0, :, :, 0],
                             np.outer(per_axis, per_axis), atol=1e-7)
