"""Every method runs end to end on configs/test.py and does what it says."""

import numpy as np
import pytest

from rebll_jax import methods, train, validate
from rebll_jax.errors import UserError
from tests.helpers import make_config
from tests.test_train import _config


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_method_runs(name, tmp_path):
  spec = methods.METHODS[name]
  # Two tasks: the second has the past model, the buffer's both blocks and
  # the later step's one compile (a third added ~1/3 to each run).
  results = train.run(_config(method=name, num_devices=1,
                              **{"protocol.num_tasks": 2}), str(tmp_path))
  tasks = results["tasks"]
  assert len(tasks) == (1 if spec.joint else 2)
  assert all(np.isfinite(t["map_seen"]) and 0 <= t["map_seen"] <= 100
             for t in tasks)
  if spec.replay:
    assert tasks[-1]["memory_rows"] > 0
  else:
    assert all(t["memory_rows"] == 0 for t in tasks)
  if spec.relabel_between_tasks:
    buffer = tasks[-1]["labels_buffer"]
    assert buffer["above_diagonal"]["count"] > 0
    assert buffer["below_diagonal"]["count"] > 0
  if spec.relabel_new_online:
    assert tasks[-1]["labels_online"]["new"]["count"] > 0
  else:
    assert "new" not in tasks[-1]["labels_online"]
  assert results["compilations"]["first"] == 1
  assert results["compilations"]["later"] == (0 if spec.joint else 1)


def test_fine_tuning_takes_unknown_labels_as_negatives():
  """METHOD.md's fine-tune baseline reads the old columns of new images as
  negatives (its defect); ``ft_masked`` reads the current columns only."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  context = {"current_mask": jnp.asarray([0., 0., 1., 1.]),
             "seen_mask": jnp.asarray([1., 1., 1., 1.])}
  labels = jnp.asarray([[0., 0., 1., 0.]])
  known = jnp.asarray([[0., 0., 1., 1.]])  # old classes unknown
  for name, want_mask in (("ft", [1., 1., 1., 1.]),
                          ("ft_masked", [0., 0., 1., 1.])):
    method = methods.METHODS[name]
    targets, mask = method.loss_targets(labels, known,
                                        method.loss_columns(context))
    np.testing.assert_array_equal(np.asarray(mask)[0], want_mask)
    np.testing.assert_array_equal(np.asarray(targets)[0], [0., 0., 1., 0.])


def test_unknown_method_lists_valid_ones():
  with pytest.raises(ValueError, match="valid:.*rebll"):
    methods.get_method("nope")


def test_relabel_thresholds_per_method():
  cfg = _config()
  cfg.relabel.update(tau_old=0.6, tau_cur=0.7, tau_pseudo=0.9,
                     tau_old_low=-1.0, tau_cur_low=0.2)
  got = methods.METHODS["rebll"].thresholds(cfg.relabel)
  assert got == dict(tau_old=0.6, tau_old_low=0.6, tau_cur=0.7,
                     tau_cur_low=0.2)
  got = methods.METHODS["asl_pl"].thresholds(cfg.relabel)
  assert got["tau_old"] == got["tau_old_low"] == 0.9


def test_two_threshold_relabeling_leaves_the_band_unknown(tmp_path):
  # A band covering (almost) every score: most entries stay unknown.
  results = train.run(_config(method="rebll", num_devices=1, **{
      "relabel.tau_old": 0.999, "relabel.tau_old_low": 0.001,
      "relabel.tau_cur": 0.999, "relabel.tau_cur_low": 0.001}),
      str(tmp_path))
  wide = results["tasks"][-1]["labels_buffer"]
  single = train.run(_config(method="rebll", num_devices=1),
                     str(tmp_path / "single"))["tasks"][-1]["labels_buffer"]
  for block in ("above_diagonal", "below_diagonal"):
    assert single[block]["unknown"] == 0
    assert wide[block]["unknown"] > 0
    assert wide[block]["count"] < single[block]["count"]


def test_a_method_checks_its_enumerated_fields():
  with pytest.raises(ValueError, match="cls_columns"):
    methods.Method("bad", "x", cls_columns="everything")
  with pytest.raises(ValueError, match="distill"):
    methods.Method("bad", "x", distill="soft")
  with pytest.raises(ValueError, match="needs replay"):
    methods.Method("bad", "x", relabel_between_tasks=True)


@pytest.mark.parametrize("name,knob,ignored", [
    ("lwf", "g_pos", True),  # lwf's classification loss is fixed BCE
    ("er", "lambda_kd", True),  # no distillation
    ("lwf", "beta", True),  # plain distillation: no decay
    ("rebll", "beta", False),
    ("rebll", "g_neg", False),
    ("lwf", "lambda_kd", False),
    # Each relabeling method reads one old-class threshold; methods that
    # relabel nothing read none. Memory sizes are never judged (a sweep
    # sets them for every method).
    ("ft", "memory.per_class", False),
    ("lwf", "memory.selection", False),
    ("rebll", "relabel.tau_pseudo", True),
    ("asl_pl", "relabel.tau_old", True),
    ("asl_pl", "relabel.tau_pseudo", False),
    ("er", "relabel.tau_cur", True),
    ("rebll", "relabel.warmup_frac", False),
])
def test_a_loss_override_the_method_ignores_is_an_error(name, knob, ignored):
  field = knob if "." in knob else f"loss.{knob}"
  value = "random" if knob == "memory.selection" else (
      7 if knob == "memory.per_class" else 0.123)
  config = _config(method=name, **{field: value})
  setting = make_config()  # configs/test.py itself: what was overridden
  if ignored:
    with pytest.raises(UserError, match=f"does not read {field} "):
      validate.check_config(config, setting)
  else:
    validate.check_config(config, setting)
  # Without the config file's own values only loss.* is judged (test.py
  # itself sizes the memory for every method).
  if "." in knob:
    validate.check_config(config)

# --------------------------------------------------------- krt_baseline ---
# The PyTorch baseline trainer's objective (KRT code, issue 16), written from
# its description: targets are the one-hot ground truth of the classes a row's
# dataset makes visible (new rows: the current block; exemplars: their own
# block up to the current one, the field-exact widening), sliced to the seen
# columns; ASL (gamma- 4, gamma+ 0, clip 0.05, eps 1e-8, focusing weights
# without gradient) summed over batch and seen columns, plus
# 180 * sqrt(n_seen / task_size) * cosine_embedding_loss(old, new, 1) on the
# pooled embeddings, old model in eval mode (a constant here).

BLOCKS = [(0, 3), (3, 6), (6, 9)]  # three tasks of 3 classes, 9 columns


def _baseline_batch(seed, task=1):
  """Our batch layout for task ``task`` (0-based), field-exact labels."""
  rng = np.random.default_rng(seed)
  low, high = BLOCKS[task]
  n_new, n_mem, classes, dim = 5, 3, 9, 6
  n = n_new + n_mem
  true = (rng.random((n, classes)) < 0.4).astype(np.float32)
  own_low = np.array([low] * n_new + list(rng.integers(0, task, n_mem) * 3))
  cols = np.arange(classes)
  visible = (cols >= own_low[:, None]) & (cols < high)  # widened exemplars
  return dict(
      labels=np.where(visible, true, 0.0).astype(np.float32),
      known=visible, true=true, own_low=own_low, low=low, high=high,
      seen_mask=(cols < high).astype(np.float32),
      current_mask=((cols >= low) & (cols < high)).astype(np.float32),
      logits=(rng.normal(size=(n, classes)) * 3).astype(np.float32),
      features=np.abs(rng.normal(size=(n, dim))).astype(np.float32),
      old_features=np.abs(rng.normal(size=(n, dim))).astype(np.float32))


def _krt_baseline_objective(b, logits, features, ddp_processes=1):
  """The krt_baseline method's own loss (steps.objective) on our batch
  layout: seen columns read, unknown entries as 0 targets."""
  from rebll_jax import steps  # pylint: disable=g-import-not-at-top
  method = methods.METHODS["krt_baseline"]
  config = _config(method="krt_baseline", **{
      "protocol.increment": int(b["current_mask"].sum()),
      "train.ddp_processes": ddp_processes})
  context = {"seen_mask": b["seen_mask"], "current_mask": b["current_mask"],
             "old_mask": b["seen_mask"] * (1 - b["current_mask"])}
  y, mask = method.loss_targets(b["labels"], b["known"],
                                method.loss_columns(context))
  loss, _ = steps.objective(
      method=method, config=config,
      out={"logits": logits, "features": features},
      old_out={"logits": logits, "features": b["old_features"]},
      labels=y, mask=mask, context=context)
  return loss


def _torch_baseline_loss(torch, b, logits, features, rows=None):
  """The baseline's compute_loss, from the description (torch autograd);
  ``rows``: one DDP process's rows of the batch (default: all)."""
  high = b["high"]
  rows = np.arange(logits.shape[0]) if rows is None else rows
  logits, features = logits[rows], features[rows]
  target = torch.zeros(len(rows), 9)
  for i, row in enumerate(b["true"][rows]):
    for c in np.flatnonzero(row):
      if b["own_low"][rows[i]] <= c < high:  # the dataset's visible classes
        target[i, c] = 1
  target = target[:, :high]
  z = logits[:, :high]  # the baseline's head has exactly `high` outputs
  p = torch.sigmoid(z)
  p_neg = (1 - p + 0.05).clamp(max=1)
  loss = (target * torch.log(p.clamp(min=1e-8)) +
          (1 - target) * torch.log(p_neg.clamp(min=1e-8)))
  with torch.no_grad():
    w = torch.pow(1 - (p * target + p_neg * (1 - target)), 4 * (1 - target))
  cls = -(loss * w).sum()
  old = torch.from_numpy(b["old_features"][rows])
  flat = torch.nn.functional.cosine_embedding_loss(
      old, features, torch.ones(features.shape[0]))
  return cls + 180. * np.sqrt(high / 3) * flat


@pytest.mark.parametrize("task", [1, 2])
def test_krt_baseline_objective_matches_the_baseline_trainer(task):
  torch = pytest.importorskip("torch", reason="torch is in the test extra")
  import jax  # pylint: disable=g-import-not-at-top
  b = _baseline_batch(task, task)
  z_t = torch.tensor(b["logits"], requires_grad=True)
  f_t = torch.tensor(b["features"], requires_grad=True)
  want = _torch_baseline_loss(torch, b, z_t, f_t)
  want.backward()
  value, (g_z, g_f) = jax.value_and_grad(
      lambda z, f: _krt_baseline_objective(b, z, f), argnums=(0, 1))(
          b["logits"], b["features"])
  np.testing.assert_allclose(value, want.item(), rtol=1e-5)
  high = b["high"]
  np.testing.assert_allclose(g_z[:, :high], z_t.grad[:, :high].numpy(),
                             rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(g_z[:, high:]) == 0)  # future columns unread
  np.testing.assert_allclose(g_f, f_t.grad.numpy(), rtol=1e-4, atol=1e-5)
  # The layout facts the method relies on: old-class columns of new rows and
  # columns below an exemplar's own block are read as 0 targets.
  y = b["labels"] * b["known"]
  new_rows = b["own_low"] == b["low"]
  assert np.all(y[new_rows][:, :b["low"]] == 0)
  assert b["true"][new_rows][:, :b["low"]].sum() > 0  # hidden positives


def test_krt_baseline_objective_matches_the_baseline_under_ddp():
  """train.ddp_processes=2: the gradient is DDP's, the mean of two
  processes' gradients of their own losses (each process's rows: every
  other row, as DistributedSampler deals them)."""
  torch = pytest.importorskip("torch", reason="torch is in the test extra")
  import jax  # pylint: disable=g-import-not-at-top
  b = _baseline_batch(3, 2)
  z_t = torch.tensor(b["logits"], requires_grad=True)
  f_t = torch.tensor(b["features"], requires_grad=True)
  n = len(b["logits"])
  for process in range(2):  # backward() adds the processes' gradients up
    _torch_baseline_loss(torch, b, z_t, f_t, np.arange(process, n, 2)
                         ).backward()
  (g_z1, _), (g_z, g_f) = (
      jax.grad(lambda z, f, p=p: _krt_baseline_objective(b, z, f, p),
               argnums=(0, 1))(b["logits"], b["features"]) for p in (1, 2))
  high = b["high"]
  np.testing.assert_allclose(g_z[:, :high], z_t.grad[:, :high].numpy() / 2,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_f, f_t.grad.numpy() / 2, rtol=1e-4, atol=1e-5)
  # One process: the summed ASL (the logits' only loss) counts twice.
  np.testing.assert_allclose(g_z1, 2 * np.asarray(g_z), rtol=1e-5, atol=1e-7)
