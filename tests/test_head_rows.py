"""model.head_rows=fresh: each task's head outputs drawn as a fresh nn.Linear.

The PyTorch baseline widens its head with a new ``nn.Linear`` at every task
(old rows copied): the new rows start at U(+-1/sqrt(D)). Ours exist from the
start, and before their task the L2 through Adam shrinks them towards 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rebll_jax import config_base, models, steps, train
from tests import helpers
from tests.helpers import make_config


def _params(d=64, c=10):
  rng = np.random.default_rng(0)
  return {"body": {"kernel": jnp.asarray(rng.normal(size=(3, 3)),
                                         jnp.float32)},
          "head": {"kernel": jnp.asarray(rng.normal(size=(d, c)), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=(c,)), jnp.float32)}}


def test_only_the_tasks_outputs_are_drawn_in_the_linear_range():
  params = _params()
  classes = jnp.asarray([2, 3, 7])
  out = steps.fresh_head_rows(params, classes, jax.random.key(1),
                              head_name="head")
  kernel, bias = np.asarray(out["head"]["kernel"]), np.asarray(
      out["head"]["bias"])
  others = [c for c in range(10) if c not in (2, 3, 7)]
  np.testing.assert_array_equal(kernel[:, others],
                                np.asarray(params["head"]["kernel"])[:, others])
  np.testing.assert_array_equal(bias[others],
                                np.asarray(params["head"]["bias"])[others])
  np.testing.assert_array_equal(out["body"]["kernel"], params["body"]["kernel"])
  bound = 1 / np.sqrt(64)
  drawn = np.concatenate([kernel[:, [2, 3, 7]].ravel(), bias[[2, 3, 7]]])
  assert np.abs(drawn).max() <= bound
  assert drawn.std() == pytest.approx(bound / np.sqrt(3), rel=0.15)  # uniform
  again = steps.fresh_head_rows(params, classes, jax.random.key(1),
                                head_name="head")
  np.testing.assert_array_equal(again["head"]["kernel"], kernel)
  other_key = steps.fresh_head_rows(params, classes, jax.random.key(2),
                                    head_name="head")
  assert not np.array_equal(other_key["head"]["kernel"], kernel)


def test_a_tresnets_first_head_kernel_is_drawn_as_its_constructor_draws_it():
  """TResNet's constructor re-draws its head's weight N(0, 0.01) (the bias
  keeps nn.Linear's U(+-1/sqrt(D))): the baseline's task-1 head."""
  params = _params(d=256, c=40)
  classes = jnp.arange(20)
  out = steps.fresh_head_rows(params, classes, jax.random.key(3),
                              head_name="head",
                              kernel_std=models.FIRST_HEAD_KERNEL_STD[
                                  "tresnet_m"])
  kernel = np.asarray(out["head"]["kernel"])[:, :20]
  assert kernel.std() == pytest.approx(0.01, rel=0.05)
  assert abs(kernel.mean()) < 1e-3
  assert np.abs(kernel).max() > 0.03  # normal tails; U(+-1/16) has none
  bias = np.asarray(out["head"]["bias"])[:20]
  assert np.abs(bias).max() <= 1 / 16
  assert bias.std() == pytest.approx(1 / 16 / np.sqrt(3), rel=0.35)
  np.testing.assert_array_equal(np.asarray(out["head"]["kernel"])[:, 20:],
                                np.asarray(params["head"]["kernel"])[:, 20:])
  assert "resnet18" not in models.FIRST_HEAD_KERNEL_STD  # torchvision: U


@pytest.mark.parametrize("arch", ["small_resnet", "resnet18", "tresnet_m"])
def test_every_arch_names_its_head(arch):
  model = models.build_model(make_config(**{"model.arch": arch}).model, 5)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                         train=False))
  assert set(shapes["params"][model.head_name]) == {"kernel", "bias"}
  assert shapes["params"][model.head_name]["kernel"].shape[-1] == 5


def test_a_fresh_run_redraws_each_tasks_rows_at_its_start(tmp_path,
                                                          monkeypatch):
  # Each task's rows are redrawn once, when the task starts, on the model
  # the previous task left. (That a resume draws nothing again:
  # tests/test_resume.py runs its kills and SIGTERM with head_rows=fresh.)
  calls = []
  real = steps.fresh_head_rows

  def recording(params, classes, key, *, head_name, kernel_std=None):
    out = real(params, classes, key, head_name=head_name,
               kernel_std=kernel_std)
    calls.append((jax.device_get(params[head_name]), np.asarray(classes),
                  jax.device_get(out[head_name])))
    stds.append(kernel_std)
    return out

  stds = []
  monkeypatch.setattr(steps, "fresh_head_rows", recording)
  # As if the small ResNet's PyTorch constructor drew its head as TResNet's.
  monkeypatch.setitem(models.FIRST_HEAD_KERNEL_STD, "small_resnet", 0.01)
  overrides = {"protocol.num_tasks": 2, "model.head_rows": "fresh",
               "train.checkpoint_every": 0}
  train.run(make_config(**overrides), str(tmp_path / "whole"))
  assert [c.tolist() for _, c, _ in calls] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert stds == [0.01, None]  # the constructor's draw for task 1 only
  assert np.asarray(calls[0][2]["kernel"])[:, :4].std() == pytest.approx(
      0.01, rel=0.2)
  before, classes, after = calls[1]
  task_1 = helpers.params_after_task(str(tmp_path / "whole"), 1)[0]["head"]
  np.testing.assert_array_equal(before["kernel"], task_1["kernel"])
  others = np.setdiff1d(np.arange(before["bias"].size), classes)
  np.testing.assert_array_equal(after["kernel"][:, others],
                                before["kernel"][:, others])
  assert np.abs(after["kernel"][:, classes]).max() <= 1 / np.sqrt(
      before["kernel"].shape[0])
  assert not np.any(after["kernel"][:, classes] == before["kernel"][:, classes])

  assert config_base.apply_field_recipe(
      config_base.base_config(), "synthetic").model.head_rows == "fresh"
  assert config_base.base_config().model.head_rows == "kept"
