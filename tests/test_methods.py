"""Every method runs end to end on configs/test.py and does what it says."""

import numpy as np
import pytest

from rebll_jax import methods, train, validate
from rebll_jax.errors import UserError
from tests.test_train import _config


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_method_runs(name, tmp_path):
  spec = methods.METHODS[name]
  results = train.run(_config(method=name, num_devices=1), str(tmp_path))
  tasks = results["tasks"]
  assert len(tasks) == (1 if spec.joint else 3)
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
])
def test_a_loss_override_the_method_ignores_is_an_error(name, knob, ignored):
  config = _config(method=name, **{f"loss.{knob}": 0.123})
  if ignored:
    with pytest.raises(UserError, match=f"does not read loss.{knob}"):
      validate.check_config(config)
  else:
    validate.check_config(config)
