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
