"""Argument checks of the experiment scripts without a test file of their
own (fault_report, bench_pipeline, model_stats, field_rows): a user's mistake
is one usage line (exit 2) before any work, never a traceback or a deletion.
"""

import argparse
import os

import pytest

from experiments import fault_report


def _usage_error(main, argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  assert exit_info.value.code == 2, argv
  err = capsys.readouterr().err
  assert "Traceback" not in err
  return err.strip().splitlines()[-1]


def test_fault_report_deletes_only_its_own_workdir(tmp_path, capsys):
  # The report empties --workdir first: it once removed any folder given
  # (a home directory, a repository) before running anything.
  folder = tmp_path / "mine"
  folder.mkdir()
  (folder / "thesis.tex").write_text("keep me")
  (folder / "uninterrupted").mkdir()
  line = _usage_error(fault_report.main, ["--workdir", str(folder)], capsys)
  assert "holds thesis.tex" in line and "would be deleted" in line
  assert (folder / "thesis.tex").read_text() == "keep me"
  line = _usage_error(fault_report.main,
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
])
def test_bench_pipeline_bad_arguments_before_any_work(argv, why, capsys,
                                                      monkeypatch):
  # Were found after the dataset was made and prepared (a usage line of
  # `python -m rebll_jax.prepare`, a ZeroDivisionError at the very end) or
  # never ('0' measured the original bytes under another name).
  from experiments import bench_pipeline  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(bench_pipeline, "_make_dataset",
                      lambda *a: pytest.fail("started the benchmark"))
  assert why in _usage_error(bench_pipeline.main, argv, capsys)


@pytest.mark.parametrize("argv,why", [
    (["--archs", "resnet18,foo"], "--archs: unknown ['foo']"),
    (["--size", "0"], "--size: must be >= 1"),
    (["--num_classes", "-3"], "--num_classes: must be >= 1"),
    (["--archs", "tresnet_m", "--size", "30"],
     "tresnet_m at --size 30: TResNet needs image sides divisible by 4"),
])
def test_model_stats_bad_arguments_are_usage_errors(argv, why, capsys):
  # Were tracebacks (ValueError, TypeError from inside JAX).
  from experiments import model_stats  # pylint: disable=g-import-not-at-top
  assert why in _usage_error(model_stats.main, argv, capsys)


def test_field_rows_refused_or_damaged_run_is_one_error(tmp_path):
  # A finished run made with other flags (method_table.run_one refuses it)
  # was a RuntimeError traceback; a damaged results.json a JSON one.
  from experiments import field_rows  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "field_augment" / "b0c4" / "rebll" / "seed0"
  workdir.mkdir(parents=True)
  (workdir / "results.json").write_text(
      '{"config": {"data": {"val_fraction": 0}}}')
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
def test_a_variant_named_twice_is_a_usage_error(tmp_path, capsys, script,
                                                argv, why):
  # field_rows started two runs in one workdir at once.
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f"experiments.{script}")
  assert why in _usage_error(module.main, argv + ["--out", str(tmp_path)],
                             capsys)
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("argv,why", [
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--growth_interval", "-3"], "--growth_interval must be >= 1, got -3"),
    (["--size", "30"], "--size must be a multiple of 8, got 30"),
])
def test_loss_scale_check_refuses_bad_sizes(capsys, argv, why):
  from experiments import loss_scale_check  # pylint: disable=g-import-not-at-top
  assert why in _usage_error(loss_scale_check.main, argv, capsys)
