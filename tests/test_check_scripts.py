"""The check scripts' own failure paths, in process and without their real
work: fault_report's --workdir guard and overhead arithmetic, gpu_check's
stage lines and stale outputs (its subprocesses faked), fetch_gpu_wheels
without a package registry. Each case was a traceback, a silent omission,
a wrong figure or a deletion of a user's folder.
"""

import json
import os
import subprocess
import types

import pytest

from experiments import fault_report, fetch_gpu_wheels, gpu_check


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err
  assert "Traceback" not in err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  return lines[0]


def _refused(argv, capsys) -> str:
  with pytest.raises(SystemExit) as exit_info:
    fault_report.main(argv)
  assert exit_info.value.code == 2
  return _one_error_line(capsys)


# ------------------------------------------------------------ fault_report ---

def test_fault_report_refuses_a_users_folder_with_report_names(tmp_path,
                                                               capsys):
  # Entry names alone were checked: a folder of the user's holding only
  # folders called nan, bad or overhead (their files inside) was deleted.
  user = tmp_path / "userdata"
  (user / "nan").mkdir(parents=True)
  (user / "bad").mkdir()
  (user / "nan" / "notes.txt").write_text("keep me")
  line = _refused(["--workdir", str(user)], capsys)
  assert "holds nan but no .rebll_fault_report file" in line
  assert (user / "nan" / "notes.txt").read_text() == "keep me"
  # A file called like one of the report's folders is not one either.
  other = tmp_path / "other"
  other.mkdir()
  (other / "overhead").write_text("mine")
  assert "holds overhead but no" in _refused(["--workdir", str(other)],
                                             capsys)
  # A report's own folder (its marker file written when it made it) is
  # taken, its runs and all.
  report = tmp_path / "report"
  (report / "nan" / "checkpoints").mkdir(parents=True)
  (report / "nan" / "results.json").write_text("{}")
  (report / fault_report.MARKER).write_text(
      fault_report._MARKER_TEXT)  # pylint: disable=protected-access
  fault_report._check_workdir(None, str(report))  # pylint: disable=protected-access
  # ... but not with a file of the user's beside them.
  (report / "thesis.tex").write_text("keep me")
  assert "holds thesis.tex" in _refused(["--workdir", str(report)], capsys)


def test_fault_report_workdir_under_a_file_is_one_line(tmp_path, capsys):
  # Was a NotADirectoryError traceback from os.makedirs.
  afile = tmp_path / "afile"
  afile.write_text("mine")
  line = _refused(["--workdir", str(afile / "sub" / "deeper")], capsys)
  assert f"{afile} is a file, not a folder" in line
  assert afile.read_text() == "mine"


def test_fault_report_marks_the_folder_it_makes(tmp_path, monkeypatch):
  # The report's first run is stopped right after it made its folder.
  class Made(Exception):
    pass

  def stop(*a, **k):
    raise Made

  monkeypatch.setattr(fault_report.Runner, "run", stop)
  workdir = tmp_path / "report"
  with pytest.raises(Made):
    fault_report.main(["--workdir", str(workdir)])
  assert os.listdir(workdir) == [fault_report.MARKER]
  (workdir / "nan").mkdir()
  (workdir / "nan" / "metrics.jsonl").write_text("")
  fault_report._check_workdir(None, str(workdir))  # pylint: disable=protected-access


def test_overhead_leaves_out_compiling_and_the_first_save():
  # 'ms per step' was (train seconds - saves) / steps: compilation and the
  # first step spread over the run, so a longer run halved the step time.
  # Saves every 5 steps of 50; steps 1-5 compile (20 s), later steps take
  # 0.1 s, the first save 2 s, later ones 0.3 s.
  saves, clock = [], 20.0
  for step in range(5, 50, 5):
    if step > 5:
      clock += 5 * 0.1
    cost = 2.0 if step == 5 else 0.3
    saves.append((step, clock, clock + cost))
    clock += cost
  saves.append((50, clock + 0.5, clock + 0.9))  # the task's end: not mid-task
  f = fault_report.overhead_figures(saves, 50, 100)
  assert f["step_s"] == pytest.approx(0.1)
  assert f["save_s"] == pytest.approx(0.3)
  assert f["fraction"] == pytest.approx(0.3 / (100 * 0.1))
  assert f["windows"] == 8 and f["saves"] == 8
  with pytest.raises(ValueError, match="too few"):
    fault_report.overhead_figures(saves[:1], 50, 100)


def test_overhead_runs_on_the_default_experiments_devices(monkeypatch):
  # The child was given 8 virtual devices; the default experiment splits
  # the CPU into its config's cpu_devices (2) before JAX is imported.
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8"
                     " --xla_cpu_enable_fast_math=false")
  env = fault_report._overhead_env("/tmp/cache")  # pylint: disable=protected-access
  assert env["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"
  code = fault_report._OVERHEAD_CHILD  # pylint: disable=protected-access
  assert code.index("split_host_cpu") < code.index("import jax")


# --------------------------------------------------------------- gpu_check ---

class _FakeStages:
  """gpu_check's stage subprocesses, faked: each takes ``cost[name]``
  seconds of a fake clock, and times out past its limit."""

  def __init__(self, monkeypatch, cost, fail=()):
    self.clock, self.cost, self.fail, self.calls = [0.0], cost, fail, []
    monkeypatch.setattr(gpu_check, "time", types.SimpleNamespace(
        perf_counter=lambda: self.clock[0]))
    monkeypatch.setattr(gpu_check.subprocess, "run", self.run)

  def run(self, cmd, timeout, **kw):
    del kw
    name = cmd[cmd.index("--stage") + 1]
    self.calls.append((name, timeout))
    self.clock[0] += min(self.cost[name], timeout)
    if self.cost[name] > timeout:
      raise subprocess.TimeoutExpired(cmd, timeout)
    if name in self.fail:
      return subprocess.CompletedProcess(cmd, 1, "", "boom\n")
    row = {"stage": name, "peak_tflops": {"float32": 1.0},
           "jax_images_per_s": 10.0}
    return subprocess.CompletedProcess(cmd, 0, json.dumps(row) + "\n", "")


def _gpu_check(tmp_path, *argv):
  code = gpu_check.main(["--rehearsal", "--out", str(tmp_path / "out"),
                         "--wheels", str(tmp_path / "no_wheels"), *argv])
  rows = [json.loads(l) for l in
          (tmp_path / "out" / "gpu_check.jsonl").read_text().splitlines()]
  return code, rows


def test_gpu_check_every_stage_says_what_happened(tmp_path, monkeypatch,
                                                  capsys):
  # With the bench skipped for time, the loader vanished without a line.
  fake = _FakeStages(monkeypatch, {"env": 5, "train": 10, "bench": 5,
                                   "loader": 5, "norm": 5})
  code, rows = _gpu_check(tmp_path, "--budget_s", "60")
  capsys.readouterr()
  assert code == 0
  by_stage = {r["stage"]: r for r in rows}
  assert list(by_stage) == ["wheels", "env", "train", "bench", "loader",
                            "norm", "done"]
  assert by_stage["bench"]["status"] == "skipped"
  assert "status" not in by_stage["loader"]  # it ran, from its own budget
  assert [n for n, _ in fake.calls] == ["env", "train", "loader", "norm"]
  # Less than the loader's minimum left: skipped, and the line says so.
  fake = _FakeStages(monkeypatch, {"env": 5, "train": 10, "bench": 5,
                                   "loader": 5, "norm": 5})
  code, rows = _gpu_check(tmp_path, "--budget_s", "20")
  capsys.readouterr()
  loader = [r for r in rows if r["stage"] == "loader"]
  assert loader == [{"stage": "loader", "status": "skipped",
                     "reason": "time budget", "budget_left_s": 5.0}]
  assert "loader" not in [n for n, _ in fake.calls]


def test_gpu_check_rerun_clears_the_previous_results(tmp_path, monkeypatch,
                                                     capsys):
  # A rerun kept the earlier run's results.json beside a train timeout,
  # and the timeout line said limit_s -0.0 for a stage run under 1 s.
  out = tmp_path / "out"
  (out / "train").mkdir(parents=True)
  (out / "results.json").write_text('{"earlier": true}')
  fake = _FakeStages(monkeypatch, {"env": 3, "train": 50, "bench": 1,
                                   "loader": 1, "norm": 1})
  code, rows = _gpu_check(tmp_path, "--budget_s", "3")
  capsys.readouterr()
  assert code == 0
  assert not (out / "results.json").exists() and not (out / "train").exists()
  train = [r for r in rows if r["stage"] == "train"]
  assert ("train", 1) in fake.calls
  assert train == [{"stage": "train", "status": "timeout", "limit_s": 1}]
  # A failed train stage leaves no earlier results either.
  (out / "results.json").write_text('{"earlier": true}')
  _FakeStages(monkeypatch, {"env": 1, "train": 1, "bench": 1, "loader": 1,
                            "norm": 1}, fail=("train",))
  _, rows = _gpu_check(tmp_path)
  capsys.readouterr()
  assert [r["status"] for r in rows if r["stage"] == "train"] == ["failed"]
  assert not (out / "results.json").exists()


@pytest.mark.parametrize("argv,says", [
    (["--out", "{afile}"], "--out {afile}: cannot make or write"),
    (["--out", "{afile}/sub"], "--out {afile}/sub: cannot make or write"),
    (["--budget_s", "nan"], "--budget_s must be a number of seconds > 0"),
    (["--budget_s", "0"], "--budget_s must be a number of seconds > 0"),
])
def test_gpu_check_bad_out_or_budget_is_one_line(tmp_path, monkeypatch,
                                                 capsys, argv, says):
  # --out naming a file was a FileExistsError traceback.
  monkeypatch.setattr(gpu_check.subprocess, "run",
                      lambda *a, **k: pytest.fail("ran a stage"))
  afile = tmp_path / "afile"
  afile.write_text("mine")
  argv = [a.format(afile=afile) for a in argv]
  if "--out" not in argv:
    argv += ["--out", str(tmp_path / "out")]
  assert gpu_check.main(["--rehearsal", *argv]) == 2
  assert says.format(afile=afile) in _one_error_line(capsys)
  assert afile.read_text() == "mine"


# -------------------------------------------------------- fetch_gpu_wheels ---

def test_fetch_without_a_registry_is_one_line(tmp_path, monkeypatch, capsys):
  # The one case the script exists to report was a CalledProcessError
  # traceback. A real pip, pointed at a closed port.
  for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
  monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
  monkeypatch.setenv("PIP_RETRIES", "0")
  monkeypatch.setenv("PIP_TIMEOUT", "2")
  assert fetch_gpu_wheels.main(["--dest", str(tmp_path / "w"),
                                "--no_local"]) == 1
  line = _one_error_line(capsys)
  assert "failed (exit 1): ERROR: No matching distribution found" in line
  assert line.endswith("run this where the package registry is reachable")


def test_fetch_dest_under_a_file_is_one_line(tmp_path, monkeypatch, capsys):
  # Was a NotADirectoryError traceback.
  monkeypatch.setattr(fetch_gpu_wheels, "download",
                      lambda *a: pytest.fail("downloaded"))
  afile = tmp_path / "afile"
  afile.write_text("mine")
  assert fetch_gpu_wheels.main(["--dest", str(afile / "x")]) == 2
  assert f"--dest {afile}/x: cannot make" in _one_error_line(capsys)
