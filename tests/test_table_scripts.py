"""experiments/method_table.py and akd_readings.py: what their tables claim.

Review 3's A4 (two readings that are one config ran twice under two
names, and METHOD.md's decay was no reading on the default setting), A7 (the
joint row of a ``*_field`` table was the plain recipe's run, unsaid) and A8
(the header said FPR@0.8 whatever eval.threshold the runs used). No training:
finished runs are written by hand with the config the table builds.
"""

import json
import os

import pytest

from configs import synthetic
from experiments import akd_readings
from experiments import method_table
from rebll_jax import run_identity

SETTINGS = sorted(synthetic.SETTINGS) + [
    f"{s}_field" for s in synthetic.SETTINGS if s != "joint"]
INCREMENTAL = [s for s in SETTINGS if "joint" not in s]


def _finished(workdir, config, avg=60.0):
  """A finished run's results.json in ``workdir`` with ``config``."""
  os.makedirs(workdir)
  task = {"task": 1, "fpr_at_threshold": 1.0, "train_seconds": 10.0,
          "labels_buffer": {}, "calibration": {}}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"avg_map": avg, "last_map": avg - 10, "cf1": 5.0, "of1": 6.0,
               "forgetting": 0.0, "tasks": [task], "config": config}, f)


def _row_config(setting, method, seed=0, overrides=(), val=False):
  return method_table.expected_config(method_table.run_flags(
      setting, method, seed, list(overrides), val))


# --- A4: akd_readings ------------------------------------------------------

@pytest.mark.parametrize("setting", INCREMENTAL)
def test_the_named_readings_are_distinct_configs_on_every_setting(setting):
  # On pretrained_b0c4 "OR band 0.05-0.5" was "decay on q + OR band"; on
  # b0c4 "decay on q" was "decay on q + OR band".
  names = [n for n in akd_readings.READINGS if n != "default"]
  configs = {}
  for name in names:
    method, overrides = akd_readings.READINGS[name]
    configs[name] = run_identity.flatten(
        _row_config(setting, method, 0, overrides, val=True))
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      assert configs[a] != configs[b], (setting, a, b)


@pytest.mark.parametrize("setting", INCREMENTAL)
def test_methods_reading_is_one_of_the_readings_on_every_setting(setting):
  # METHOD.md: a_c = exp(-beta |2 q_c - 1|), the single 0.5 threshold.
  config = akd_readings.reading_config(setting, "decay on |2q-1|")
  assert config["loss.decay_on"] == "confidence"
  assert config["relabel.tau_old_low"] < 0 and config["relabel.tau_cur_low"] < 0
  assert config["relabel.tau_old"] == config["relabel.tau_cur"] == 0.5
  kept = akd_readings.same_config(setting, list(akd_readings.READINGS))
  assert "decay on |2q-1|" in kept
  # "default" is always one of the explicit readings, and is folded into it.
  assert "default" not in kept
  assert sum(len(v) for v in kept.values()) == 1


def test_same_config_keeps_the_explicit_name():
  kept = akd_readings.same_config("pretrained_b0c4",
                                  ["default", "decay on q", "OR band 0.05-0.5"])
  assert kept == {"decay on q": ["default"], "OR band 0.05-0.5": []}
  kept = akd_readings.same_config("b0c4", ["default", "decay on q"])
  assert kept == {"default": [], "decay on q": []}


def test_readings_of_one_config_run_once_with_a_note(tmp_path, capsys):
  out = tmp_path / "akd"
  for name in ("decay on q", "default"):
    method, overrides = akd_readings.READINGS[name]
    _finished(str(out / akd_readings._slug(name) / "pretrained_b0c4"  # pylint: disable=protected-access
                  / method / "seed0"),
              _row_config("pretrained_b0c4", method, 0, overrides, val=True))
  akd_readings.main(["--readings", "default,decay_on_q", "--report_only",
                     "--out", str(out)])
  captured = capsys.readouterr()
  assert ("note: reading 'default' is the same config as 'decay on q' on "
          "pretrained_b0c4") in captured.err
  rows = [line for line in captured.out.splitlines()
          if line.startswith("| ") and not line.startswith("| reading")]
  assert rows == ["| decay on q | `loss.decay_on=score` | "
                  "`relabel.tau_old_low=-1.0`, `relabel.tau_cur_low=-1.0` | 1 "
                  "| 60.0 | 50.0 | – | – | – | – |"]
  assert ("decay on q: the same config as 'default' on pretrained_b0c4 (run "
          "once).") in captured.out


def test_the_overrides_column_says_what_changes_methods_reading():
  split = akd_readings.split_overrides
  assert split("b0c4", "decay on |2q-1|") == ([], [
      "loss.decay_on=confidence", "relabel.tau_old_low=-1.0",
      "relabel.tau_cur_low=-1.0"])
  assert split("b0c4", "OR band 0.05-0.5") == (
      ["relabel.tau_old_low=0.05", "relabel.tau_cur_low=0.05"],
      ["loss.decay_on=confidence"])
  assert split("b0c4", "both (g_pos 1, w_neg 2)") == (
      ["loss.w_neg=2.0"], ["loss.g_pos=1.0"])
  assert split("b0c4", "default") == ([], [])


# --- A7: the joint row of a *_field table ----------------------------------

def test_pretrained_field_tables_use_the_field_joint():
  for setting in ("pretrained_b0c4_field", "pretrained_b10c2_field"):
    assert method_table._joint_setting(setting) == "pretrained_joint_field"  # pylint: disable=protected-access
    assert not method_table.joint_is_plain(setting)
    joint = run_identity.flatten(_row_config(setting, "joint"))
    rebll = run_identity.flatten(_row_config(setting, "rebll"))
    differ = {k for k in rebll if joint.get(k) != rebll[k]}
    assert differ == {"method", "protocol.base", "protocol.increment"}, differ
  assert method_table._joint_setting("pretrained_b0c4") == "pretrained_joint"  # pylint: disable=protected-access
  assert method_table._workdir("O", "pretrained_b0c4_field", "joint", 1) == (  # pylint: disable=protected-access
      os.path.join("O", "pretrained_joint_field", "joint", "seed1"))


def test_a_field_table_says_its_joint_row_is_the_plain_recipe(tmp_path,
                                                              capsys):
  out = str(tmp_path)
  assert method_table.joint_is_plain("b0c4_field")
  assert not method_table.joint_is_plain("b0c4")
  _finished(os.path.join(out, "joint", "joint", "seed0"),
            _row_config("b0c4_field", "joint"), avg=89.0)
  _finished(os.path.join(out, "b0c4_field", "rebll", "seed0"),
            _row_config("b0c4_field", "rebll"))
  method_table.main(["--settings", "b0c4_field,b0c4", "--seeds", "0",
                     "--methods", "rebll,joint", "--out", out,
                     "--report_only"])
  capsys.readouterr()
  text = open(os.path.join(out, "table.md")).read()
  field, plain = text.split("**Synthetic B0C4**")
  assert "| joint (plain recipe) | 1 | 89.0 |" in field
  assert "joint (plain recipe): configs/synthetic.py has no joint_field" in (
      field)
  assert "| joint | 1 | 89.0 |" in plain and "plain recipe" not in plain
  calib = open(os.path.join(out, "calibration.md")).read()
  assert "| joint (plain recipe) | 1 |" in calib


# --- A8: the threshold of CF1 / OF1 / test FPR -----------------------------

def test_the_header_gives_the_runs_threshold(tmp_path, capsys):
  out = str(tmp_path)
  _finished(os.path.join(out, "b0c4", "rebll", "seed0"),
            _row_config("b0c4", "rebll", 0, ["eval.threshold=0.5"]))
  method_table.main(["--settings", "b0c4", "--seeds", "0", "--methods",
                     "rebll", "--out", out, "--report_only", "--set",
                     "eval.threshold=0.5"])
  capsys.readouterr()
  text = open(os.path.join(out, "table.md")).read()
  assert "| test FPR@0.5 |" in text and "0.8" not in text
  assert "CF1, OF1 and test FPR at eval.threshold 0.5" in text


def test_rows_at_other_thresholds_are_said_so():
  def run(threshold):
    return {"calibration": {}, "avg_map": 1.0, "last_map": 1.0, "cf1": 1.0,
            "of1": 1.0, "test_fpr": 1.0, "relabel_fpr": None,
            "relabel_fnr": None, "seconds": 1.0, "wall": 0.0,
            "threshold": threshold}
  rows = {("b0c4", "rebll"): [run(0.8), run(0.8)],
          ("b0c4", "lwf"): [run(0.5)], ("joint", "joint"): [run(None)]}
  text = method_table.table(rows, ["b0c4"], ["lwf", "rebll", "joint"])
  assert "| test FPR@eval.threshold |" in text and "FPR@0.8" not in text
  assert ("differ in eval.threshold (? where results.json has none); CF1, "
          "OF1 and test FPR are each run's own: lwf 0.5; rebll 0.8; joint ?"
          ) in text
  rows = {("b0c4", "rebll"): [run(0.8)]}
  assert "| test FPR@0.8 |" in method_table.table(rows, ["b0c4"], ["rebll"])


def test_methods_reading_row_is_one_table_row(tmp_path, capsys):
  # Its name holds "|": unescaped, the markdown row would split.
  out = tmp_path / "akd"
  method, overrides = akd_readings.READINGS["decay on |2q-1|"]
  _finished(str(out / "decay_on_2q_1" / "b0c4" / method / "seed0"),
            _row_config("b0c4", method, 0, overrides, val=True))
  akd_readings.main(["--setting", "b0c4", "--readings", "decay_on_2q_1",
                     "--report_only", "--out", str(out)])
  row = [line for line in capsys.readouterr().out.splitlines()
         if line.startswith("| decay")]
  assert row == ["| decay on \\|2q-1\\| | – | `loss.decay_on=confidence`, "
                 "`relabel.tau_old_low=-1.0`, `relabel.tau_cur_low=-1.0` | 1 "
                 "| 60.0 | 50.0 | – | – | – | – |"]
