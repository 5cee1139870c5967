"""The pretrained regime's settings and its method-table plumbing."""

import json
import os

import pytest

from configs import synthetic as synthetic_config
from experiments import method_table
from rebll_jax import upstream


def test_pretrained_settings():
  scratch = synthetic_config.get_config("b0c4")
  for name in ("pretrained_b0c4", "pretrained_b10c2", "pretrained_joint"):
    c = synthetic_config.get_config(name)
    assert c.model.init_from == upstream.AUTO
    # METHOD.md's single threshold and tau_pseudo 0.5; a smaller first rate.
    assert c.relabel.tau_old_low < 0 and c.relabel.tau_cur_low < 0
    assert c.relabel.tau_old == c.relabel.tau_cur == 0.5
    assert c.relabel.tau_pseudo == 0.5
    assert c.loss.decay_on == "score"  # the reading validation chose
    assert c.optim.lr_first < scratch.optim.lr_first
    assert c.optim.lr_later > c.optim.lr_first
    # One upstream backbone serves every pretrained setting.
    assert upstream.content_key(c) == upstream.content_key(
        synthetic_config.get_config("pretrained_b0c4"))
  assert synthetic_config.get_config("pretrained_b10c2").protocol.base == 10
  assert synthetic_config.get_config("pretrained_joint").method == "joint"
  # The from-scratch settings keep their validated band and no init.
  assert scratch.model.init_from == "" and scratch.relabel.tau_old_low == 0.05
  assert scratch.relabel.tau_pseudo == 0.9 and "upstream" not in scratch


def _write(out, setting, method, seed, calibration, overrides=(), val=False):
  workdir = os.path.join(out, setting, method, f"seed{seed}")
  os.makedirs(workdir)
  task = {"fpr_at_threshold": 0.0, "train_seconds": 1.0,
          "calibration": calibration}
  # The config the table builds for the row: a finished run it reuses.
  config = method_table.expected_config(method_table.run_flags(
      setting, method, seed, list(overrides), val))
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"avg_map": 70.0, "last_map": 60.0, "cf1": 1.0, "of1": 2.0,
               "tasks": [task], "config": config}, f)


def _calibration(pos_old, ece):
  group = {"pos_mean": pos_old, "neg_mean": 0.1, "frac_pos_below": 0.25,
           "frac_neg_above": 0.0, "ece": ece, "bias": -0.05}
  return {"old": group, "current": dict(group, pos_mean=0.9), "seen": group}


def test_calibration_table_and_joint_regime(tmp_path):
  out = str(tmp_path)
  _write(out, "pretrained_b0c4", "rebll", 0, _calibration(0.6, 0.02))
  _write(out, "pretrained_b0c4", "rebll", 1, _calibration(0.8, 0.04))
  # joint of the pretrained regime lives under pretrained_joint, not joint.
  _write(out, "pretrained_joint", "joint", 0, _calibration(0.7, 0.01))
  method_table.main(["--settings", "pretrained_b0c4", "--seeds", "0,1",
                     "--methods", "rebll,joint", "--out", out,
                     "--report_only"])
  lines = open(os.path.join(out, "calibration.md")).read().splitlines()
  header = next(l for l in lines if l.startswith("| method"))
  rows = {l.split(" | ")[0].strip("| "): l.strip("| ").split(" | ")
          for l in lines if l.startswith("| ") and l != header}
  columns = header.strip("| ").split(" | ")
  rebll = dict(zip(columns, rows["rebll"]))
  assert rebll["seeds"] == "2"
  assert rebll["pos mean old"] == "70.0 ± 10.0"  # percent, mean ± std
  assert rebll["pos mean cur"] == "90.0 ± 0.0"
  assert rebll["ECE seen"] == "3.0 ± 1.0"
  assert rebll["bias seen"] == "-5.0 ± 0.0"
  assert dict(zip(columns, rows["joint"]))["ECE seen"] == "1.0"
  table = open(os.path.join(out, "table.md")).read()
  assert "| joint | 1 |" in table


def test_akd_readings_report(tmp_path):
  from experiments import akd_readings
  out = str(tmp_path)
  # Two seeds of "decay on q", one of the lwf bar; nothing for the rest.
  for seed, pos_old in ((0, 0.6), (1, 0.8)):
    _write(os.path.join(out, "decay_on_q"), "pretrained_b0c4", "rebll", seed,
           _calibration(pos_old, 0.02), ("loss.decay_on=score",), val=True)
  _write(os.path.join(out, "bar_lwf"), "pretrained_b0c4", "lwf", 0,
         _calibration(0.5, 0.02), val=True)
  akd_readings.main(["--seeds", "0,1", "--out", out, "--report_only"])
  lines = open(os.path.join(out, "readings.md")).read().splitlines()
  rows = {l.split(" | ")[0].strip("| "): l.strip("| ").split(" | ")
          for l in lines if l.startswith("| ") and "---" not in l}
  assert set(rows) == {"reading", "decay on q", "bar: lwf"}
  columns = rows["reading"]
  decay = dict(zip(columns, rows["decay on q"]))
  assert decay["overrides"] == "`loss.decay_on=score`"
  assert decay["seeds"] == "2" and decay["val avg mAP"] == "70.0 ± 0.0"
  assert decay["pos mean old"] == "70.0 ± 10.0"
  assert dict(zip(columns, rows["bar: lwf"]))["seeds"] == "1"
  with pytest.raises(SystemExit):
    akd_readings.main(["--readings", "not_a_reading", "--out", out])
