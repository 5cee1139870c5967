"""experiments/method_table.py: aggregation of finished runs into the table.

Builds results.json files by hand (two seeds, known numbers) and checks the
``--report_only`` table: mean ± std over seeds, relabel FPR/FNR summed over
the buffer blocks, "–" where a method relabels nothing. Bad input is a usage error before
anything runs, and the first failing run ends the table.
"""

import json
import os
import subprocess

import pytest

from experiments import method_table


def _write(out, setting, method, seed, avg, buffer):
  workdir = os.path.join(out, setting, method, f"seed{seed}")
  os.makedirs(workdir)
  task = {"fpr_at_threshold": 1.0, "train_seconds": 10.0,
          "labels_buffer": buffer}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"avg_map": avg, "last_map": avg - 10, "cf1": 5.0, "of1": 6.0,
               "tasks": [task, task]}, f)


def test_report_only_table(tmp_path, capsys):
  out = str(tmp_path)
  blocks = {"above_diagonal": {"tp": 1, "fp": 1, "tn": 3, "fn": 3},
            "below_diagonal": {"tp": 0, "fp": 1, "tn": 5, "fn": 1}}
  _write(out, "b0c4", "rebll", 0, 60.0, blocks)
  _write(out, "b0c4", "rebll", 1, 62.0, blocks)
  _write(out, "b0c4", "lwf", 0, 50.0, {})
  method_table.main(["--settings", "b0c4", "--seeds", "0,1", "--methods",
                     "lwf,rebll,ft", "--out", out, "--report_only"])
  text = open(os.path.join(out, "table.md")).read()
  assert text in capsys.readouterr().out
  rows = {line.split(" | ")[0].strip("| "): line.split(" | ")
          for line in text.splitlines() if line.startswith("| ")
          and not line.startswith("| method")}
  assert "ft" not in rows  # no finished run: no row
  rebll = rows["rebll"]
  assert rebll[1] == "2" and rebll[2] == "61.0 ± 1.0"
  assert rebll[3] == "51.0 ± 1.0"
  # FPR = fp / (fp + tn) = 2 / 10, FNR = fn / (fn + tp) = 4 / 5 (percent).
  assert rebll[7] == "20.0 ± 0.0" and rebll[8] == "80.0 ± 0.0"
  assert rebll[9] == "20 ± 0 |"  # train seconds: two tasks of 10 s
  assert rows["lwf"][7] == "–" and rows["lwf"][8] == "–"


def test_bad_input_is_a_usage_error(tmp_path, capsys):
  for argv in (["--settings", "b0c5"], ["--seeds", "a"], ["--seeds", "-1"],
               ["--jobs", "0"], ["--methods", "foo"]):
    with pytest.raises(SystemExit) as exit_info:
      method_table.main(argv + ["--out", str(tmp_path)])
    assert exit_info.value.code == 2, argv
  assert "unknown setting 'b0c5'" in capsys.readouterr().err
  assert not os.listdir(tmp_path)  # nothing started


@pytest.mark.parametrize("flag,value,twice", [
    ("--methods", "ft,rebll,ft", "ft"), ("--settings", "b0c4,b0c4", "b0c4"),
    ("--seeds", "0,1,0", "0")])
def test_a_value_named_twice_is_a_usage_error(tmp_path, capsys, flag, value,
                                              twice):
  # Methods and settings printed their rows twice; a seed counted one run
  # twice in the mean ± std. (--report_only: never trains, fix or not.)
  _write(str(tmp_path), "b0c4", "ft", 0, 50.0, {})
  argv = {"--methods": "ft", "--settings": "b0c4", "--seeds": "0"}
  argv[flag] = value
  with pytest.raises(SystemExit) as exit_info:
    method_table.main([a for kv in argv.items() for a in kv] +
                      ["--out", str(tmp_path), "--report_only"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.splitlines()[-1].endswith(
      f"error: {flag} names {twice} more than once; give each once")
  assert "Traceback" not in err
  assert os.listdir(tmp_path) == ["b0c4"]  # no table written


def test_report_only_without_runs_is_an_error(tmp_path):
  with pytest.raises(SystemExit, match="no finished run"):
    method_table.main(["--out", str(tmp_path), "--report_only"])


def test_a_failing_run_stops_the_table(tmp_path):
  # A bad override makes every run fail; the first failure ends the table
  # with a non-zero exit naming the run, and the other runs never start.
  with pytest.raises(SystemExit) as exit_info:
    method_table.main(["--settings", "b0c4", "--seeds", "0,1", "--methods",
                       "ft,lwf", "--out", str(tmp_path), "--set",
                       "train.no_such_knob=1"])
  message = str(exit_info.value.code)
  assert message.startswith("error: b0c4 ") and "no_such_knob" in message
  assert not (tmp_path / "b0c4" / "ft" / "seed1").exists()
  assert not (tmp_path / "b0c4" / "lwf").exists()


def test_runs_share_a_compilation_cache(tmp_path, monkeypatch):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  seen = []
  def fake_run(cmd, env=None, **kwargs):
    seen.append(env)
    workdir = next(c.split("=", 1)[1] for c in cmd
                   if c.startswith("--workdir="))
    _write(os.path.dirname(os.path.dirname(os.path.dirname(workdir))),
           "b0c4", "ft", 0, 50.0, {})
    return subprocess.CompletedProcess(cmd, 0, "", "")
  monkeypatch.setattr(method_table.subprocess, "run", fake_run)
  out = str(tmp_path / "t")
  method_table.main(["--settings", "b0c4", "--seeds", "0", "--methods",
                     "ft", "--out", out])
  assert seen[0]["JAX_COMPILATION_CACHE_DIR"] == os.path.join(
      os.path.abspath(out), "xla_cache")
  # "off" gives none; a cache the caller already set is kept.
  assert "JAX_COMPILATION_CACHE_DIR" not in method_table.child_environment(
      "off")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
  assert method_table.child_environment("x")[
      "JAX_COMPILATION_CACHE_DIR"] == "/elsewhere"


def test_a_finished_run_with_other_overrides_is_not_reported_as_cached(
    tmp_path):
  workdir = os.path.join(str(tmp_path), "b0c4", "ft", "seed0")
  os.makedirs(workdir)
  config = {"train": {"epochs_first": 1, "global_batch": 16},
            "optim": {"lr_first": 0.003}, "model": {"stage_sizes": [1, 1]},
            "data": {"val_fraction": 0.0}}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"config": config}, f)
  same = ["train.epochs_first=1", "optim.lr_first=3e-3",
          "model.stage_sizes=[1,1]"]
  assert method_table.run_one(str(tmp_path), "b0c4", "ft", 0, same,
                              val=False)[2] == "cached"
  for overrides, val, why in (
      (["train.epochs_first=5"], False, "train.epochs_first: the run has 1, "
       "this table asks for 5"),
      (["optim.lr_first=0.05"], False, "optim.lr_first"),
      (["train.no_such=1"], False, "train.no_such: the run has no such"),
      (same, True, "--val: the run has data.val_fraction=0.0")):
    with pytest.raises(RuntimeError, match="holds a finished run made with "
                       "other settings") as error:
      method_table.run_one(str(tmp_path), "b0c4", "ft", 0, overrides, val)
    assert why in str(error.value)


@pytest.mark.parametrize("content,why", [
    ('{"avg_map": 1', "results.json is unreadable"),
    ("[]", "holds a list, not a run's results"),
    ("{}", "is not a finished run's results (no 'tasks')"),
    ('{"tasks": []}', "is not a finished run's results (no task)"),
])
def test_a_damaged_results_json_is_one_error_not_a_traceback(
    tmp_path, content, why):
  workdir = tmp_path / "b0c4" / "ft" / "seed0"
  workdir.mkdir(parents=True)
  (workdir / "results.json").write_text(content)
  with pytest.raises(SystemExit) as exit_info:
    method_table.main(["--settings", "b0c4", "--seeds", "0", "--methods",
                       "ft", "--out", str(tmp_path), "--report_only"])
  message = str(exit_info.value.code)
  assert message.startswith("error: b0c4 ft seed 0: ") and why in message
  assert "delete that workdir" in message


@pytest.mark.parametrize("override", ["train.epochs_later", "=4", " =4"])
def test_set_without_key_value_is_a_usage_error(tmp_path, capsys, override):
  with pytest.raises(SystemExit) as exit_info:
    method_table.main(["--settings", "b0c4", "--out", str(tmp_path),
                       "--set", override])
  assert exit_info.value.code == 2
  assert "expected KEY=VALUE" in capsys.readouterr().err
  assert not os.listdir(tmp_path)  # nothing started
