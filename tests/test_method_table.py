"""experiments/method_table.py: aggregation of finished runs into the table.

Builds results.json files by hand (two seeds, known numbers) and checks the
``--report_only`` table: mean ± std over seeds, relabel FPR/FNR summed over
the buffer blocks, "–" where a method relabels nothing. Bad input is a usage error before
anything runs, and the first failing run ends the table. A finished run is
reused only when its whole config is the one the table builds for the row;
Ctrl-C and SIGTERM stop the child runs, then the table (130 / 143).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from experiments import child_runs
from experiments import method_table
from rebll_jax import main as cli


def _cli_config(flags):
  """results.json's config of a run of ``python -m rebll_jax.main FLAGS``."""
  return json.loads(cli.build_config(flags).to_json_best_effort())


def _config(setting, method, seed, overrides=(), val=False):
  """The config a finished run of this row has: the table's command."""
  config_file = os.path.join(method_table.ROOT, "configs", "synthetic.py")
  return _cli_config(
      [f"--config={config_file}:{setting}", f"--config.method={method}",
       f"--config.seed={seed}", "--config.train.progress=False"]
      + (["--config.data.val_fraction=0.2"] if val else [])
      + [f"--config.{o}" for o in overrides])


def _write(out, setting, method, seed, avg, buffer, config=None):
  workdir = os.path.join(out, setting, method, f"seed{seed}")
  os.makedirs(workdir)
  task = {"fpr_at_threshold": 1.0, "train_seconds": 10.0,
          "labels_buffer": buffer}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"avg_map": avg, "last_map": avg - 10, "cf1": 5.0, "of1": 6.0,
               "tasks": [task, task],
               "config": config or _config(setting, method, seed)}, f)


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
  # The std is numpy's population std (ddof=0), and the table says so.
  assert text.rstrip().endswith("std: population (ddof=0)")


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


def test_a_failing_run_stops_the_table(tmp_path, monkeypatch):
  # A run that fails (its flags pass the CLI's checks; say, the disk fills)
  # ends the table with a non-zero exit naming the run and its stderr, and
  # the other runs never start.
  started = []
  def failing_run(cmd, **kwargs):
    started.append(cmd)
    if len(started) > 1:
      time.sleep(1)  # the one picked up while the table stops; it finishes
    return subprocess.CompletedProcess(cmd, 1, "", "error: disk full\n")
  monkeypatch.setattr(method_table.child_runs, "run", failing_run)
  with pytest.raises(SystemExit) as exit_info:
    method_table.main(["--settings", "b0c4", "--seeds", "0,1", "--methods",
                       "ft,lwf", "--out", str(tmp_path)])
  message = str(exit_info.value.code)
  assert message.startswith("error: b0c4 ft seed 0: ")
  assert "error: disk full" in message
  assert len(started) <= 2  # the failed run and at most one already started
  assert not any("--config.method=lwf" in cmd for cmd in started)


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
  monkeypatch.setattr(method_table.child_runs, "run", fake_run)
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
  same = ["train.epochs_first=1", "optim.lr_first=3e-3",
          "model.stage_sizes=[1,1]"]
  _write(str(tmp_path), "b0c4", "ft", 0, 50.0, {},
         _config("b0c4", "ft", 0, same))
  assert method_table.run_one(str(tmp_path), "b0c4", "ft", 0, same,
                              val=False)[2] == "cached"
  for overrides, val, why in (
      (["train.epochs_first=5"], False, "train.epochs_first: the run has 1, "
       "this table asks for 5"),
      (["optim.lr_first=0.05"], False, "optim.lr_first"),
      (same + ["train.no_such=1"], False, "unknown config key 'train.no_such'"),
      (same, True, "data.val_fraction: the run has 0.0, this table asks for "
       "0.2")):
    with pytest.raises(RuntimeError) as error:
      method_table.run_one(str(tmp_path), "b0c4", "ft", 0, overrides, val)
    assert why in str(error.value)


def _hostile_config(**changes):
  """b0c4 ft seed 0's config with dotted fields changed."""
  config = _config("b0c4", "ft", 0)
  for field, value in changes.items():
    *sections, key = field.split("__")
    node = config
    for name in sections:
      node = node[name]
    node[key] = value
  return config


@pytest.mark.parametrize("changes,why", [
    # Was reused: only the fields named by the current --set were compared.
    ({"train__epochs_later": 4}, "train.epochs_later: the run has 4, this "
     "table asks for 8"),
    # method and seed were never compared with the row.
    ({"method": "lwf"}, "method: the run has 'lwf', this table asks for 'ft'"),
    ({"seed": 7}, "seed: the run has 7, this table asks for 0"),
    ({"loss__lambda_kd": 3.0}, "loss.lambda_kd: the run has 3.0"),
])
def test_a_finished_run_made_with_other_settings_is_refused(tmp_path, changes,
                                                            why):
  _write(str(tmp_path), "b0c4", "ft", 0, 70.0, {}, _hostile_config(**changes))
  with pytest.raises(SystemExit) as exit_info:
    method_table.main(["--settings", "b0c4", "--seeds", "0", "--methods",
                       "ft", "--out", str(tmp_path), "--report_only"])
  message = str(exit_info.value.code)
  assert "holds a finished run made with other settings" in message
  assert why in message
  assert not (tmp_path / "table.md").exists()


def test_fields_that_do_not_change_results_may_differ(tmp_path):
  # Devices, logging, checkpoint cadence, paths: MAY_CHANGE_ON_RESUME less
  # the fields that extend a run (RESULTS_DEPEND_ON).
  config = _hostile_config(num_devices=1, cpu_devices=0,
                           train__log_every=7, train__checkpoint_every=3,
                           data__num_workers=1)
  _write(str(tmp_path), "b0c4", "ft", 0, 70.0, {}, config)
  assert method_table.run_one(str(tmp_path), "b0c4", "ft", 0, [],
                              val=False)[2] == "cached"


@pytest.mark.parametrize("override", ["method=ft", "seed=7", " seed =7"])
def test_set_of_a_table_axis_is_a_usage_error(tmp_path, capsys, override):
  # --set method=ft made every row the same run (the last flag won).
  with pytest.raises(SystemExit) as exit_info:
    method_table.main(["--settings", "b0c4", "--methods", "ft,lwf",
                       "--out", str(tmp_path), "--set", override])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "is an axis of the table" in err and "Traceback" not in err
  assert not os.listdir(tmp_path)


def _fake_cli(cmd, env=None, **kwargs):
  """A child run that writes the results.json the CLI would: the config
  built from the command's own flags."""
  del env, kwargs
  workdir = next(c.split("=", 1)[1] for c in cmd
                 if c.startswith("--workdir="))
  flags = [c for c in cmd if c.startswith("--config")]
  os.makedirs(workdir)
  task = {"fpr_at_threshold": 1.0, "train_seconds": 1.0}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"avg_map": 50.0, "last_map": 40.0, "cf1": 5.0, "of1": 6.0,
               "tasks": [task],
               "config": _cli_config(flags)}, f)
  return subprocess.CompletedProcess(cmd, 0, "", "")


def test_a_finished_run_is_reused_whatever_the_spelling(tmp_path):
  # Were refused as made "with other settings": (1,1) against the stored
  # [1, 1], .5 against 0.5, and data.val_fraction=0.2 without --val.
  stored = ["model.stage_sizes=[1,1]", "optim.lr_first=0.5",
            "data.val_fraction=0.2"]
  for seed in (0, 1):
    _write(str(tmp_path), "b0c4", "ft", seed, 50.0, {},
           _config("b0c4", "ft", seed, stored))
  method_table.main(["--settings", "b0c4", "--seeds", "0,1", "--methods",
                     "ft", "--out", str(tmp_path), "--report_only",
                     "--set", "model.stage_sizes=(1,1)",
                     "--set", "optim.lr_first=.5",
                     "--set", "data.val_fraction=0.2"])
  assert "| ft | 2 | 50.0 ± 0.0 |" in (tmp_path / "table.md").read_text()


def test_a_rerun_reuses_the_runs_it_made(tmp_path, monkeypatch):
  monkeypatch.setattr(method_table.child_runs, "run", _fake_cli)
  argv = ["--settings", "b0c4,b10c2", "--seeds", "0,1", "--methods",
          "ft,joint", "--out", str(tmp_path), "--compile_cache", "off",
          "--set", "model.stage_sizes=(1,1)", "--val"]
  method_table.main(argv)
  monkeypatch.setattr(method_table.child_runs, "run",
                      lambda *a, **k: pytest.fail("ran a finished run again"))
  method_table.main(argv)


# A child run that waits to be stopped; says which signal stopped it.
_CHILD = """
import signal, sys, time
marker = sys.argv[1]
def stop(signum, frame):
  time.sleep(0.5)  # a checkpoint being saved: the table must wait for it
  open(marker, "w").write(str(signum))
  sys.exit(128 + signum)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
open(marker + ".started", "w").close()
time.sleep(120)  # never reached when the table forwards the signal
"""


@pytest.mark.parametrize("signum,code,line", [
    (signal.SIGINT, 130, "interrupted: the runs started stopped"),
    (signal.SIGTERM, 143, "stopped by SIGTERM: the runs started stopped"),
])
def test_ctrl_c_and_sigterm_stop_the_runs_then_the_table(
    tmp_path, monkeypatch, capsys, request, signum, code, line):
  # Was a KeyboardInterrupt traceback (and SIGTERM left the runs going).
  if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
    pytest.skip("SIGTERM is handled by the test runner")
  # A suite started in the background by a non-interactive shell inherits
  # SIGINT ignored (POSIX), and Python then keeps it ignored: give the
  # table Python's own Ctrl-C, as a terminal would.
  previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
  request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous_sigint))
  real_run = child_runs.run
  started = []

  def slow_child(cmd, **kwargs):
    marker = str(tmp_path / f"child{len(started)}")
    started.append(marker)
    return real_run([sys.executable, "-c", _CHILD, marker],
                    **{k: v for k, v in kwargs.items() if k != "cwd"})

  sent = []

  def signal_when_started():
    # A generous wait: on a loaded machine the child takes long to start.
    deadline = time.time() + 120
    while not os.path.exists(str(tmp_path / "child0.started")):
      if time.time() > deadline:
        return
      time.sleep(0.05)
    sent.append(time.time())
    os.kill(os.getpid(), signum)

  monkeypatch.setattr(method_table.child_runs, "run", slow_child)
  threading.Thread(target=signal_when_started, daemon=True).start()
  out = tmp_path / "table"
  with pytest.raises(SystemExit) as exit_info:
    method_table.main(["--settings", "b0c4", "--seeds", "0,1", "--methods",
                       "ft", "--out", str(out), "--jobs", "1",
                       "--compile_cache", "off"])
  assert sent, "the child run never started"
  assert exit_info.value.code == code
  # The child got the same signal and had ended (its marker written after
  # a pause) before the table exited; the second run never started.
  assert (tmp_path / "child0").read_text() == str(int(signum))
  assert len(started) <= 2  # the failed run and at most one already started
  assert not any("--config.method=lwf" in cmd for cmd in started)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(line)


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


def test_the_expected_config_is_the_clis_and_touches_no_flags():
  # rebll_jax.main.build_config: the CLI's parsing in a flag set of its
  # own; the process's FLAGS and the file config main() reads stay as
  # they were, and a refused flag is the CLI's one line.
  remembered = dict(cli._FILE_CONFIG)  # pylint: disable=protected-access
  config = method_table.expected_config(method_table.run_flags(
      "b10c2", "lwf", 3, ["optim.lr_first=.5"], True))
  assert (config["method"], config["seed"]) == ("lwf", 3)
  assert config["protocol"]["base"] == 10
  assert config["optim"]["lr_first"] == 0.5
  assert config["data"]["val_fraction"] == 0.2
  assert not config["train"]["progress"]
  assert cli._FILE_CONFIG == remembered  # pylint: disable=protected-access
  assert "config.optim.lr_first" not in cli.FLAGS  # its own flag set
  with pytest.raises(RuntimeError, match="bad run flags: bad value in "
                     "--config.optim.lr_first=abc"):
    method_table.expected_config(method_table.run_flags(
        "b0c4", "ft", 0, ["optim.lr_first=abc"], False))


def test_a_run_extended_with_another_schedule_is_not_this_tables(tmp_path):
  """Its config is the last process's: the task rows say what each task
  trained with (a run resumed at a task boundary with another
  epochs_later)."""
  config = _config("b0c4", "ft", 0)
  _write(str(tmp_path), "b0c4", "ft", 0, 70.0, {}, config)
  path = tmp_path / "b0c4" / "ft" / "seed0" / "results.json"
  results = json.loads(path.read_text())
  results["tasks"] = [
      {**results["tasks"][0], "task": 1, "epochs": config["train"][
          "epochs_first"], "lr_peak": config["optim"]["lr_first"]},
      {**results["tasks"][1], "task": 2, "epochs": 1,
       "lr_peak": config["optim"]["lr_later"]}]
  path.write_text(json.dumps(results))
  with pytest.raises(RuntimeError, match="task 2 trained with epochs 1"):
    method_table.run_one(str(tmp_path), "b0c4", "ft", 0, [], val=False)
  results["tasks"][1]["epochs"] = config["train"]["epochs_later"]
  path.write_text(json.dumps(results))
  assert method_table.run_one(str(tmp_path), "b0c4", "ft", 0, [],
                              val=False)[2] == "cached"


def test_an_unfinished_run_of_other_settings_is_not_resumed(tmp_path,
                                                            monkeypatch):
  """A workdir with checkpoints and config.json but no results.json: the
  child would resume it under this table's flags, its first tasks trained
  with the old ones."""
  ran = []
  monkeypatch.setattr(method_table.child_runs, "run", lambda cmd, **kw: (
      ran.append(cmd), subprocess.CompletedProcess(cmd, 0, "", ""))[1])
  workdir = tmp_path / "b0c4" / "ft" / "seed0"
  workdir.mkdir(parents=True)
  started = _config("b0c4", "ft", 0, ["train.epochs_later=1"])
  (workdir / "config.json").write_text(json.dumps(started))
  with pytest.raises(RuntimeError, match="holds a run started with other "
                     "settings .*train.epochs_later: the run has 1"):
    method_table.run_one(str(tmp_path), "b0c4", "ft", 0, [], val=False)
  assert not ran
  # The same settings: resumed (the child is started).
  assert method_table.run_one(str(tmp_path), "b0c4", "ft", 0,
                              ["train.epochs_later=1"], val=False)[2] == "ran"
  assert len(ran) == 1


@pytest.mark.parametrize("override,why", [
    ("optim.lr_first=abc", "bad value in --config.optim.lr_first=abc"),
    ("train.epochs_later=-1", "train.epochs_later must be an integer"),
    ("nosuch.x=1", "unknown config key 'nosuch.x'"),
])
def test_a_set_the_cli_refuses_is_a_usage_error_before_any_run(
    tmp_path, capsys, override, why):
  with pytest.raises(SystemExit) as exit_info:
    method_table.main(["--settings", "b0c4", "--seeds", "0", "--methods",
                       "ft,rebll", "--out", str(tmp_path), "--set", override])
  assert exit_info.value.code == 2
  assert why in capsys.readouterr().err
  assert not os.listdir(tmp_path)  # nothing started
