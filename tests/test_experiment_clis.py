"""Argument checks of the experiment scripts without a test file of their
own (fault_report, bench_pipeline, model_stats, field_rows, akd_readings): a
user's mistake is one usage line (exit 2) before any work, never a traceback
or a deletion; a damaged, foreign or failed run is one error line.
"""

import argparse
import json
import os
import subprocess

import pytest

from experiments import fault_report
from tests.helpers import usage_error_line




def test_fault_report_deletes_only_its_own_workdir(tmp_path, capsys):
  # The report empties --workdir first: it once removed any folder given
  # (a home directory, a repository) before running anything.
  folder = tmp_path / "mine"
  folder.mkdir()
  (folder / "thesis.tex").write_text("keep me")
  (folder / "uninterrupted").mkdir()
  line = usage_error_line(fault_report.main, ["--workdir", str(folder)], capsys)
  assert "holds thesis.tex" in line and "would be deleted" in line
  assert (folder / "thesis.tex").read_text() == "keep me"
  line = usage_error_line(fault_report.main,
                      ["--workdir", str(folder / "thesis.tex")], capsys)
  assert "is a file or a link, not a folder" in line
  # A previous report's folder (or a new or empty one) is taken.
  parser = argparse.ArgumentParser()
  previous = tmp_path / "previous"
  for name in ("uninterrupted", "kill_inside_0", "kill_inside_2", "bad",
               "jax_cache", "overhead", "two_processes"):
    (previous / name).mkdir(parents=True)
  for ok in (previous, tmp_path / "new", tmp_path / "empty"):
    os.makedirs(tmp_path / "empty", exist_ok=True)
    fault_report._check_workdir(parser, str(ok))  # pylint: disable=protected-access


@pytest.mark.parametrize("argv,why", [
    (["--storages", "foo"], "--storages 'foo': expected original, N or "
     "Nsquash"),
    (["--storages", "original,0"], "--storages '0'"),
    (["--storages", "256squashx"], "--storages '256squashx'"),
    (["--storages", ","], "--storages names no storage"),
    (["--assumed_step_ms", "0"], "--assumed_step_ms must be > 0"),
    # Were a UserError traceback after the dataset was made and prepared:
    # the reader does not upsample a stored size.
    (["--size", "256"], "--storages '224squash' stores 224 px images; "
     "--size 256 would upsample them"),
    (["--storages", "16", "--size", "32"], "--storages '16' stores 16 px"),
])
def test_bench_pipeline_bad_arguments_before_any_work(argv, why, capsys,
                                                      monkeypatch):
  # Were found after the dataset was made and prepared (a usage line of
  # `python -m rebll_jax.prepare`, a ZeroDivisionError at the very end) or
  # never ('0' measured the original bytes under another name).
  from experiments import bench_pipeline  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(bench_pipeline, "_make_dataset",
                      lambda *a: pytest.fail("started the benchmark"))
  assert why in usage_error_line(bench_pipeline.main, argv, capsys)


@pytest.mark.parametrize("argv,why", [
    (["--archs", "resnet18,foo"], "--archs: unknown ['foo']"),
    (["--size", "0"], "--size: must be >= 1"),
    (["--num_classes", "-3"], "--num_classes: must be >= 1"),
    (["--archs", "tresnet_m", "--size", "30"],
     "tresnet_m at --size 30: TResNet needs image sides divisible by 4"),
    # Printed the row twice.
    (["--archs", "resnet18,resnet18"], "--archs names resnet18 more than "
     "once"),
])
def test_model_stats_bad_arguments_are_usage_errors(argv, why, capsys):
  # Were tracebacks (ValueError, TypeError from inside JAX).
  from experiments import model_stats  # pylint: disable=g-import-not-at-top
  assert why in usage_error_line(model_stats.main, argv, capsys)


def test_field_rows_refused_or_damaged_run_is_one_error(tmp_path):
  # A finished run made with other flags (method_table.run_one refuses it)
  # was a RuntimeError traceback; a damaged results.json a JSON one.
  from experiments import field_rows  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "field_augment" / "b0c4" / "rebll" / "seed0"
  _finished(str(workdir), {"data": {"val_fraction": 0}})
  argv = ["--variants", "field_augment", "--seeds", "0", "--out",
          str(tmp_path)]
  with pytest.raises(SystemExit) as exit_info:
    field_rows.main(argv)
  message = str(exit_info.value.code)
  assert message.startswith("error: field_augment seed 0: ")
  assert "holds a finished run made with other settings" in message
  (workdir / "results.json").write_text('{"config": ')
  with pytest.raises(SystemExit) as exit_info:
    field_rows.main(argv)
  assert "results.json is unreadable" in str(exit_info.value.code)


@pytest.mark.parametrize("script,argv,why", [
    ("field_rows", ["--variants", "ours,ddp2,ours"], "--variants names ours"),
    ("akd_readings", ["--readings", "default,default"],
     "--readings names default"),
])
def test_a_variant_named_twice_is_ausage_error_line(tmp_path, capsys, script,
                                                argv, why):
  # field_rows started two runs in one workdir at once.
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f"experiments.{script}")
  assert why in usage_error_line(module.main, argv + ["--out", str(tmp_path)],
                             capsys)
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("argv,why", [
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--growth_interval", "-3"], "--growth_interval must be >= 1, got -3"),
    (["--size", "30"], "--size must be a multiple of 8, got 30"),
])
def test_loss_scale_check_refuses_bad_sizes(capsys, argv, why):
  from experiments import loss_scale_check  # pylint: disable=g-import-not-at-top
  assert why in usage_error_line(loss_scale_check.main, argv, capsys)


def _finished(workdir, config, avg=60.0):
  """A finished run's results.json in ``workdir`` with ``config``."""
  os.makedirs(workdir)
  task = {"fpr_at_threshold": 1.0, "train_seconds": 10.0, "map_seen": avg}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"avg_map": avg, "last_map": avg - 10, "cf1": 5.0, "of1": 6.0,
               "forgetting": 2.0, "tasks": [task], "config": config}, f)


def _row_config(method_table, setting, method, seed, overrides, val):
  return method_table.expected_config(method_table.run_flags(
      setting, method, seed, list(overrides), val))


def test_field_rows_reuses_its_runs_and_names_its_std(tmp_path, capsys):
  from experiments import field_rows  # pylint: disable=g-import-not-at-top
  for seed, avg in ((0, 60.0), (1, 62.0)):
    _finished(str(tmp_path / "widened" / "b0c4" / "rebll" / f"seed{seed}"),
              _row_config(field_rows.method_table, "b0c4", "rebll", seed,
                          field_rows.VARIANTS["widened"], False), avg)
  field_rows.main(["--variants", "widened", "--seeds", "0,1", "--out",
                   str(tmp_path)])
  out = capsys.readouterr().out
  # The sample std (ddof=1) of 60 and 62, as before; the table says which.
  assert "| widened | 2 | 61.0 ± 1.4 |" in out
  assert "std: sample (ddof=1)" in out


def _akd(argv, tmp_path):
  from experiments import akd_readings  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as exit_info:
    akd_readings.main(argv + ["--out", str(tmp_path / "akd")])
  return exit_info.value.code


def test_akd_readings_bad_setting_is_ausage_error_line(tmp_path, capsys):
  # Started a run, then a RuntimeError traceback.
  assert _akd(["--setting", "nonsense", "--readings", "default"],
              tmp_path) == 2
  err = capsys.readouterr().err
  assert "unknown setting 'nonsense'" in err and "Traceback" not in err
  assert not (tmp_path / "akd").exists()


def test_akd_readings_report_only_without_runs_is_an_error(tmp_path):
  # Wrote an empty table and exited 0.
  code = _akd(["--readings", "default", "--report_only"], tmp_path)
  assert code == f"error: no finished run under {tmp_path / 'akd'}; " \
      "nothing to report"
  assert not (tmp_path / "akd").exists()


def test_akd_readings_damaged_or_foreign_run_is_one_error(tmp_path):
  # A damaged results.json was a RuntimeError traceback; a run made with
  # other settings was reported as the reading's.
  workdir = tmp_path / "akd" / "default" / "pretrained_b0c4" / "rebll" / "seed0"
  workdir.mkdir(parents=True)
  (workdir / "results.json").write_text('{"x":')
  code = _akd(["--readings", "default", "--report_only"], tmp_path)
  assert code.startswith("error: default seed 0: ") and "\n" not in code
  assert f"{workdir}/results.json is unreadable" in code
  (workdir / "results.json").unlink()
  from experiments import method_table  # pylint: disable=g-import-not-at-top
  os.rmdir(workdir)
  _finished(str(workdir), _row_config(method_table, "pretrained_b0c4",
                                      "rebll", 0, (), val=False))
  code = _akd(["--readings", "default", "--report_only"], tmp_path)
  assert "holds a finished run made with other settings (" \
      "data.val_fraction: the run has 0.0, this table asks for 0.2" in code


def test_akd_readings_failed_run_is_one_error(tmp_path, monkeypatch):
  # Was a RuntimeError traceback from future.result().
  from experiments import child_runs  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(child_runs, "run", lambda cmd, **kwargs: (
      subprocess.CompletedProcess(cmd, 1, "", "error: out of luck\n")))
  code = _akd(["--readings", "default", "--setting", "b0c4"], tmp_path)
  assert code.startswith("error: default seed 0: ")
  assert "failed:\nerror: out of luck" in code
