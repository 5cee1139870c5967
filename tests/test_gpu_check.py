"""experiments/gpu_check.py: the CPU rehearsal of the GPU check, end to end.

The rehearsal runs every stage (environment, a 2-task training run, the step
benchmark, the loader) on the CPU at tiny sizes, with every installed
distribution that the GPU image lacks hidden from the import system (the
carried packages come from experiments/gpu_wheels/ when it holds wheels for
this Python, else from this environment). Plus the pieces: hiding, the
offline wheel install, and fetch_gpu_wheels' size limit.
"""

import json
import os
import subprocess
import sys
import zipfile

import pytest

from experiments import fetch_gpu_wheels, gpu_check, gpu_image

ROOT = gpu_check.ROOT


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT
  env.pop("XLA_FLAGS", None)  # one CPU device, as on the GPU image
  return env


def test_rehearsal_runs_every_stage(tmp_path):
  pytest.importorskip("torch")
  proc = subprocess.run(
      [sys.executable, "experiments/gpu_check.py", "--rehearsal",
       "--out", str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True,
      text=True, timeout=600, check=True)
  rows = [json.loads(l) for l in proc.stdout.splitlines()]
  saved = [json.loads(l) for l in
           (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
  assert rows == saved
  assert not [r for r in rows if r.get("status") in ("failed", "timeout")]
  by_stage = {}
  for r in rows:
    by_stage.setdefault(r["stage"], []).append(r)
  assert list(by_stage) == ["wheels", "env", "train", "bench", "loader",
                            "norm", "done"]
  env = by_stage["env"][0]
  assert env["jax_backend"] == "cpu" and env["peak_tflops"]["float32"] > 0
  train = by_stage["train"][0]
  assert train["method"] == "rebll" and len(train["map_seen"]) == 2
  results = json.loads((tmp_path / "results.json").read_text())
  assert [t["task"] for t in results["tasks"]] == [1, 2]
  bench = by_stage["bench"][-1]
  assert bench["fastest_torch"] == "torch_eager"
  assert bench["jax_vs_fastest_torch"] > 0
  assert all(r["mfu_vs_env_peak"] > 0 for r in bench["rows"])
  norm = by_stage["norm"][-1]
  assert set(norm["ms_per_step"]) == {"flax", "fused"}
  assert norm["fused_speedup"] > 0
  loader = by_stage["loader"][0]
  assert set(loader["storages"]) == {"original_640x480", "store_size_256",
                                     "store_size_32_squash"}
  for s in loader["storages"].values():
    assert s["images_per_s_1_workers"] > 0 and s["cores_per_gpu"] > 0
  # Stored small, the images are far fewer bytes than the originals.
  assert (loader["storages"]["store_size_256"]["kb_per_image"] <
          loader["storages"]["original_640x480"]["kb_per_image"] / 2)


def test_hidden_packages_are_not_importable():
  code = (
      "import argparse, importlib.util, sys\n"
      "from experiments import gpu_check\n"
      "gpu_check.setup_stage(argparse.Namespace(target='', rehearsal=True))\n"
      "assert importlib.util.find_spec('tensorflow_datasets') is None\n"
      "assert importlib.util.find_spec('pycocotools') is None\n"
      "try:\n"
      "  import tensorflow_datasets\n"
      "  sys.exit('imported')\n"
      "except ModuleNotFoundError:\n"
      "  pass\n"
      "import numpy, ml_collections, rebll_jax.train\n"
      "print('ok')\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=120)
  if "No module named 'tensorflow_datasets'" in proc.stderr:
    pytest.skip("tensorflow-datasets is not installed here")
  assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


def _fake_wheel(folder, name, version="1.0", body="VALUE = 42\n"):
  path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
  info = f"{name}-{version}.dist-info"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(f"{name}/__init__.py", body)
    z.writestr(f"{info}/METADATA",
               f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
               "Root-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr(f"{info}/RECORD", "")
  return path


def test_install_wheels_offline_into_a_target(tmp_path):
  wheels, target = tmp_path / "wheels", tmp_path / "target"
  wheels.mkdir()
  _fake_wheel(str(wheels), "rebll_fake_pkg")
  out = gpu_image.install_wheels(str(wheels), str(target),
                                 packages=("rebll-fake-pkg",))
  assert out["installed"] == ["rebll-fake-pkg"]
  assert (target / "rebll_fake_pkg" / "__init__.py").read_text() == (
      "VALUE = 42\n")
  with pytest.raises(RuntimeError, match="other_pkg"):
    gpu_image.install_wheels(str(wheels), str(target),
                             packages=("rebll-fake-pkg", "other_pkg"))


def test_wheel_tags_match_this_python():
  v = f"{sys.version_info.major}{sys.version_info.minor}"
  tags = gpu_image._compatible_tags()  # pylint: disable=protected-access
  ours = f"x-1-cp{v}-cp{v}-manylinux_2_17_x86_64.whl"
  other = "x-1-cp39-cp39-manylinux_2_17_x86_64.whl"
  assert gpu_image._wheel_tags(ours) & tags  # pylint: disable=protected-access
  assert not gpu_image._wheel_tags(other) & tags  # pylint: disable=protected-access
  assert gpu_image._wheel_tags("x-1-py3-none-any.whl") & tags  # pylint: disable=protected-access


def test_fetch_refuses_more_than_the_size_limit(tmp_path, monkeypatch,
                                                capsys):
  def fake_download(req, dest, python_version):
    del python_version
    name = req.split("==")[0].replace("-", "_")
    _fake_wheel(dest, name, body="#" * size[0])

  monkeypatch.setattr(fetch_gpu_wheels, "download", fake_download)
  size = [1000]
  assert fetch_gpu_wheels.main(["--dest", str(tmp_path / "a")]) == 0
  line = json.loads(capsys.readouterr().out)
  assert len(line["wheels"]) == len(gpu_image.CARRIED)
  monkeypatch.setattr(fetch_gpu_wheels, "LIMIT_BYTES", 2000)
  assert fetch_gpu_wheels.main(["--dest", str(tmp_path / "b")]) == 2
  assert "over the 0 MiB limit" in capsys.readouterr().err
