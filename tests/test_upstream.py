"""Upstream pretraining: disjoint classes, an unchanged benchmark, a tiny
pretrain -> save -> load round trip and the content-keyed cache."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rebll_jax import models, upstream
from rebll_jax.data import synthetic
from rebll_jax.errors import UserError
from rebll_jax.models import pretrained
from tests.helpers import make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# sha256 of synthetic.generate(60, 7, 32) (images then labels) before the
# upstream family was added: the benchmark must stay bit-identical.
BENCHMARK_SHA256 = (
    "4ca4f5069a7da8723edd7013f44d28abd60b2ea18272e43cf04a2826fe55716e")


def test_benchmark_images_unchanged():
  images, labels = synthetic.generate(60, 7, 32)
  digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
  assert digest == BENCHMARK_SHA256


def test_upstream_classes_are_not_benchmark_classes():
  benchmark = [(synthetic.SHAPES[k % 10], synthetic.TEXTURES[k // 10],
                synthetic.PALETTE[k]) for k in range(synthetic.NUM_CLASSES)]
  colours = synthetic.upstream_colours()
  classes = synthetic.upstream_classes()
  assert len(classes) == synthetic.MAX_UPSTREAM_CLASSES == 64
  assert len(set(classes)) == len(classes)
  assert len(set(synthetic.upstream_class_names())) == len(classes)
  for shape, texture, colour in classes:
    for b_shape, b_texture, b_colour in benchmark:
      if (shape, texture) == (b_shape, b_texture):
        # Same shape and texture: the colour must be far from the class's.
        distance = np.sqrt(((colours[colour] - b_colour)**2).sum())
        assert distance >= synthetic.UPSTREAM_MIN_COLOUR_DISTANCE
  # The rule bites: the benchmark's own triples are benchmark-like, and
  # upstream draws on new shapes and textures too.
  assert all(synthetic.is_benchmark_like(*b) for b in benchmark)
  assert {s for s, _, _ in classes} - set(synthetic.SHAPES)
  assert {t for _, t, _ in classes} - set(synthetic.TEXTURES)
  # A smaller upstream set is a prefix of the full one.
  assert synthetic.upstream_classes(5) == classes[:5]
  with pytest.raises(ValueError, match="num_classes"):
    synthetic.upstream_classes(65)


def test_upstream_images():
  images, labels = synthetic.generate_upstream(40, 3, 32, 8)
  assert images.shape == (40, 32, 32, 3) and labels.shape == (40, 8)
  assert 1 <= labels.sum(1).min() and labels.sum(1).max() <= 4
  again, _ = synthetic.generate_upstream.__wrapped__(40, 3, 32, 8)
  np.testing.assert_array_equal(images, again)  # a function of the seed


def _tiny_config(**overrides):
  config = make_config(**{"model.init_from": upstream.AUTO})
  config.unlock()
  config.upstream = upstream.default_config()
  config.upstream.update(dict(num_classes=6, num_train=48, num_test=16,
                              render_size=32, epochs=1, global_batch=16))
  config.upstream.update(overrides)
  config.lock()
  return config


def test_pretrain_cache_and_load(tmp_path, monkeypatch):
  monkeypatch.setenv(upstream.CACHE_ENV, str(tmp_path))
  config = _tiny_config()
  directory = upstream.resolve_init_from(config)
  assert directory == os.path.join(str(tmp_path), "upstream",
                                   upstream.content_key(config))
  info = json.load(open(os.path.join(directory, "info.json")))
  assert info["arch"] == "small_resnet" and info["steps"] == 3
  assert len(info["upstream_classes"]) == 6
  assert info["dropped"]["classifier head"]  # the 6-class head is left out

  # A second resolution reuses the cache instead of training.
  monkeypatch.setattr(upstream, "pretrain", lambda *a: pytest.fail("trained"))
  assert upstream.resolve_init_from(config) == directory
  # Another upstream budget is another key.
  assert upstream.content_key(_tiny_config(epochs=2)) != upstream.content_key(
      config)

  # Loading into a 20-class model (shapes suffice: no init to compile):
  # every backbone leaf comes from the checkpoint, the head stays fresh.
  def fresh_variables(width, num_classes):
    model = models.build_model(
        make_config(**{"model.width": width}).model, num_classes)
    return jax.eval_shape(lambda: model.init(
        jax.random.key(1), jnp.zeros((1, 32, 32, 3)), train=False))

  fresh = fresh_variables(config.model.width, 20)
  loaded, load_info = pretrained.load_pretrained(fresh, directory,
                                                 "small_resnet")
  saved, _ = pretrained.load_converted(directory)
  flat_saved = flax.traverse_util.flatten_dict(saved)
  flat_loaded = flax.traverse_util.flatten_dict(loaded)
  flat_fresh = flax.traverse_util.flatten_dict(fresh)
  assert load_info["num_loaded"] == len(flat_saved)
  assert set(flat_loaded) == set(flat_fresh)
  for key, value in flat_saved.items():
    np.testing.assert_array_equal(np.asarray(flat_loaded[key]), value)
  head = [k for k in flat_fresh if k[:2] == ("params", "head")]
  assert head and all(flat_loaded[k] is flat_fresh[k] for k in head)
  assert flat_fresh[("params", "head", "kernel")].shape[-1] == 20

  # Another model shape does not fit: a listed mismatch, not a silent load.
  with pytest.raises(ValueError, match="wrong shape"):
    pretrained.load_pretrained(fresh_variables(12, 20), directory,
                               "small_resnet")


def test_a_killed_runs_staging_copy_is_removed(tmp_path, monkeypatch):
  # A run killed while pretraining left DIR.tmpPID behind for good.
  monkeypatch.setenv(upstream.CACHE_ENV, str(tmp_path))
  config = _tiny_config()
  directory = upstream.cache_dir(config)
  stale = f"{directory}.tmp4242"
  os.makedirs(os.path.join(stale, "half"))
  unrelated = f"{directory}.tmp4242x"  # not a staging name: kept
  os.makedirs(unrelated)

  def fails(config, out_dir):
    os.makedirs(out_dir)
    raise RuntimeError("diverged")

  monkeypatch.setattr(upstream, "pretrain", fails)
  with pytest.raises(RuntimeError, match="diverged"):
    upstream.ensure(config)
  # The stale copy and this run's own half-written one are gone.
  assert sorted(os.listdir(os.path.dirname(directory))) == sorted(
      [os.path.basename(directory) + ".lock", os.path.basename(unrelated)])

  def writes(config, out_dir):
    os.makedirs(out_dir)
    with open(os.path.join(out_dir, "info.json"), "w") as f:
      f.write("{}")

  monkeypatch.setattr(upstream, "pretrain", writes)
  assert upstream.ensure(config) == directory
  assert os.path.isfile(os.path.join(directory, "info.json"))


def test_resolve_errors_and_passthrough():
  assert upstream.resolve_init_from(make_config()) == ""
  assert upstream.resolve_init_from(
      make_config(**{"model.init_from": "/some/dir"})) == "/some/dir"
  with pytest.raises(UserError, match="only upstream value"):
    upstream.resolve_init_from(
        make_config(**{"model.init_from": "upstream:big"}))
  with pytest.raises(UserError, match="small_resnet"):
    upstream.resolve_init_from(make_config(
        **{"model.init_from": upstream.AUTO, "model.arch": "resnet18"}))


# The pretrained_* settings shrunk to seconds: tiny benchmark, model and
# upstream budget (the upstream block is part of those settings' configs).
TINY_PRETRAINED = (
    "data.image_size=32", "data.synthetic.num_train=96",
    "data.synthetic.num_test=48", "data.synthetic.render_size=32",
    "protocol.num_tasks=2", "model.width=8", "model.stage_sizes=(1,1)",
    "train.global_batch=16", "train.epochs_first=1", "train.epochs_later=1",
    "train.progress=False", "memory.per_class=2", "upstream.num_classes=6",
    "upstream.num_train=48", "upstream.num_test=16",
    "upstream.render_size=32", "upstream.epochs=1",
    "upstream.global_batch=16")


def _cli(workdir, cache, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env[upstream.CACHE_ENV] = cache
  return subprocess.run(
      [sys.executable, "-m", "rebll_jax.main",
       "--config=configs/synthetic.py:pretrained_b0c4",
       f"--workdir={workdir}",
       *[f"--config.{o}" for o in (*TINY_PRETRAINED, *extra)]],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_pretrained_setting_runs_from_the_command_line(tmp_path):
  """The whole path a user takes: upstream:auto trains the cache entry, the
  run loads it and finishes (a config check once refused the upstream
  block of every pretrained setting)."""
  cache = str(tmp_path / "cache")
  result = _cli(str(tmp_path / "run"), cache)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.load(open(tmp_path / "run" / "results.json"))
  assert len(results["tasks"]) == 2
  assert os.listdir(os.path.join(cache, "upstream"))  # trained and cached
  # A method that does not read the setting's loss.decay_on still runs (a
  # setting's knob is not an override) and reuses the cached backbone.
  lwf = _cli(str(tmp_path / "lwf"), cache, "method=lwf")
  assert lwf.returncode == 0, lwf.stderr[-3000:]
  assert "pretraining the upstream backbone" not in lwf.stderr
  # ... but an override it does not read is refused on one line.
  bad = _cli(str(tmp_path / "lwf_beta"), cache, "method=lwf", "loss.beta=0.5")
  assert bad.returncode == 2 and "does not read loss.beta" in bad.stderr
  # A bad value inside the block is refused by the CLI's field checks (in
  # this process: the same parse and check_values the CLI runs before JAX).
  from rebll_jax import config_checks, main as run_cli  # pylint: disable=g-import-not-at-top
  for override, says in (("upstream.epochs=0", "upstream.epochs must be"),
                         ("upstream.num_classes=65", "upstream.num_classes")):
    config = run_cli.build_config([
        f"--config={ROOT}/configs/synthetic.py:pretrained_b0c4",
        *[f"--config.{o}" for o in (*TINY_PRETRAINED, override)]])
    with pytest.raises(UserError, match=says):
      config_checks.check_values(config)


def test_upstream_block_fields_have_rules_and_typos_are_refused():
  from rebll_jax import config_checks
  defaults = dict(config_checks.leaves(upstream.default_config(),
                                       "upstream."))
  numeric = {k for k, v in defaults.items() if config_checks.is_number(v)}
  assert numeric == set(config_checks.OPTIONAL_RULES)
  for key in numeric:
    config_checks.check_value(key, defaults[key])  # defaults accepted
  config = _tiny_config()
  config_checks.check_values(config)
  config.upstream.unlock()
  config.upstream.epoch = 3  # a typo of 'epochs'
  with pytest.raises(UserError, match="upstream.epoch'"):
    config_checks.check_values(config)


def _cli_in_process(tmp_path, monkeypatch):
  """upstream.main() in this process: its cache under tmp_path, run from the
  repository root; main() sets up its logger for a process of its own, which
  is undone afterwards."""
  monkeypatch.setenv(upstream.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.chdir(ROOT)
  monkeypatch.setattr(upstream.log, "handlers", list(upstream.log.handlers))
  for attr in ("level", "propagate"):
    monkeypatch.setattr(upstream.log, attr, getattr(upstream.log, attr))


def test_cli_refuses_a_bad_config_file_and_another_configs_out(
    tmp_path, monkeypatch, capsys):
  # No pretraining: every case stops before ensure() would train.
  _cli_in_process(tmp_path, monkeypatch)
  monkeypatch.setattr(upstream, "pretrain", lambda *a: pytest.fail("trained"))

  def error_line(*argv):
    assert upstream.main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err

  # A config that is not a .py file, or does not parse: was a traceback.
  not_python = tmp_path / "config.json"
  not_python.write_text("{}")
  assert "not a Python config file" in error_line("--config", str(not_python))
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(setting):\n  return (\n")
  assert "line 2" in error_line("--config", str(broken))
  # An --out holding the backbone of another config was printed as this
  # config's (exit 0); now refused, naming both keys.
  spec = "configs/synthetic.py:pretrained_b0c4"
  other = tmp_path / "other"
  other.mkdir()
  (other / "info.json").write_text(json.dumps({
      "content_key": "0123456789abcdef", "upstream_classes": ["a"],
      "upstream_test_map": 50.0, "steps": 3}))
  err = error_line("--config", spec, "--out", str(other))
  assert "another config (key 0123456789abcdef" in err
  assert upstream.content_key(upstream.load_config(spec)) in err
  (other / "info.json").write_text("[1")
  assert "info.json is unreadable" in error_line("--config", spec, "--out",
                                                 str(other))
  # This config's own --out is reused, not trained again.
  key = upstream.content_key(upstream.load_config(spec))
  (other / "info.json").write_text(json.dumps({
      "content_key": key, "upstream_classes": ["a"],
      "upstream_test_map": 50.0, "steps": 3}))
  assert upstream.main(["--config", spec, "--out", str(other)]) == 0
  assert f"upstream backbone ({key})" in capsys.readouterr().out


@pytest.mark.parametrize("body,why", [
    ("import no_such_module_here\ndef get_config(arg=None):\n  pass\n",
     "ModuleNotFoundError: No module named 'no_such_module_here'"),
    ("def get_config(arg=None):\n  return None\n",
     "get_config() returned None, not an ml_collections.ConfigDict"),
    ("def get_config(arg=None):\n  return {}['x']\n", "KeyError: x"),
    ("def get_config(arg=None):\n  return {'model': 1}\n",
     "get_config() returned a dict, not an ml_collections.ConfigDict"),
    ("def get_config(arg=None):\n  if arg:\n    raise ValueError("
     "'no settings')\n  return None\n", "ValueError: no settings"),
    ("import ml_collections\ndef get_config(arg=None):\n"
     "  return ml_collections.ConfigDict()\n",
     "field(s) of rebll_jax/config_base.py"),
])
def test_cli_bad_config_files_are_one_line(tmp_path, monkeypatch, capsys,
                                           body, why):
  # Each was a traceback (exit 1): load_config caught only SyntaxError,
  # ValueError and AttributeError, and None or a dict failed in main().
  _cli_in_process(tmp_path, monkeypatch)
  monkeypatch.setattr(upstream, "pretrain", lambda *a: pytest.fail("trained"))
  config = tmp_path / "cfg.py"
  config.write_text(body)
  spec = f"{config}:xyz" if "ValueError" in why else str(config)
  assert upstream.main(["--config", spec, "--out",
                        str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: "), err
  assert why in err
  assert not (tmp_path / "out").exists()


def test_cli_refuses_a_setting_of_configs_test(tmp_path, monkeypatch,
                                               capsys):
  # configs/test.py has no settings: ':xyz' used to start pretraining.
  _cli_in_process(tmp_path, monkeypatch)
  monkeypatch.setattr(upstream, "pretrain", lambda *a: pytest.fail("trained"))
  assert upstream.main(["--config", "configs/test.py:xyz"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert err.startswith("error: cannot load config 'configs/test.py:xyz'")


def test_a_file_in_the_way_of_the_cache_or_out_is_one_line(
    tmp_path, monkeypatch, capsys):
  # --out under a file was a FileExistsError traceback, $REBLL_JAX_CACHE
  # naming a file a NotADirectoryError one (the lock's makedirs); a run
  # with model.init_from=upstream:auto reaches the same code through
  # resolve_init_from, whose UserError the training CLI prints as one line.
  _cli_in_process(tmp_path, monkeypatch)
  monkeypatch.setattr(upstream, "pretrain", lambda *a: pytest.fail("trained"))
  afile = tmp_path / "afile"
  afile.write_text("mine")
  spec = "configs/synthetic.py:pretrained_b0c4"
  assert upstream.main(["--config", spec, "--out", str(afile / "sub")]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "Traceback" not in err
  assert f"{afile} is a file, not a folder; choose another --out" in err
  monkeypatch.setenv(upstream.CACHE_ENV, str(afile))
  assert upstream.main(["--config", spec]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and upstream.CACHE_ENV in err
  with pytest.raises(UserError, match="is a file, not a folder"):
    upstream.resolve_init_from(upstream.load_config(spec))
  assert afile.read_text() == "mine"


@pytest.mark.parametrize("stop", ["SIGTERM", KeyboardInterrupt])
def test_cli_stopped_while_pretraining_says_so_and_cleans_up(
    tmp_path, monkeypatch, capsys, stop):
  # SIGTERM killed the CLI at once: no message, its staging copy left
  # behind; Ctrl-C printed a traceback.
  _cli_in_process(tmp_path, monkeypatch)

  def stopped(config, out_dir):
    os.makedirs(os.path.join(out_dir, "half"))
    if stop == "SIGTERM":
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)  # the handler raises in this thread first
    raise KeyboardInterrupt

  monkeypatch.setattr(upstream, "pretrain", stopped)
  handler = signal.getsignal(signal.SIGTERM)
  spec = "configs/synthetic.py:pretrained_b0c4"
  assert upstream.main(["--config", spec]) == (143 if stop == "SIGTERM"
                                               else 130)
  err = capsys.readouterr().err.strip().splitlines()
  assert "Traceback" not in "\n".join(err)
  assert err[-1] == ("stopped by SIGTERM: " if stop == "SIGTERM"
                     else "interrupted: ") + upstream.STOPPED
  directory = upstream.cache_dir(upstream.load_config(spec))
  assert os.listdir(os.path.dirname(directory)) == [
      os.path.basename(directory) + ".lock"]  # no staging copy, no result
  assert signal.getsignal(signal.SIGTERM) == handler


def test_pretraining_reads_only_what_its_cache_key_holds():
  # A _field setting's augmentation, Adam beta1 cycle and loss scaling
  # used to reach pretraining under the plain setting's cache key: the
  # first of the two to run decided the backbone both then loaded.
  from rebll_jax import run_identity  # pylint: disable=g-import-not-at-top
  plain = upstream.load_config(os.path.join(
      ROOT, "configs/synthetic.py:pretrained_b0c4"))
  field = upstream.load_config(os.path.join(
      ROOT, "configs/synthetic.py:pretrained_b0c4_field"))
  field.optim.grad_clip = 1.0  # any other run knob too
  field.loss.g_neg = 1.0
  assert upstream.content_key(plain) == upstream.content_key(field)
  flat = lambda c: run_identity.flatten(upstream._train_config(c)[0])  # noqa: E731,SLF001
  assert flat(plain) == flat(field)
  # A keyed input changes both the key and what pretraining reads.
  field.model.width += 8
  assert upstream.content_key(plain) != upstream.content_key(field)
  assert flat(plain)["model.width"] != flat(field)["model.width"]
  # Kernel choices (float32 rounding only) are the run's.
  field.model.conv_impl = "gemm"
  assert flat(field)["model.conv_impl"] == "gemm"


def test_the_format_version_is_in_the_key(monkeypatch):
  """Version 2: entries of version 1 may hold a backbone a _field setting
  trained under the plain setting's key; bumping the version must make a
  new key, so they are never loaded again."""
  config = _tiny_config()
  key = upstream.content_key(config)
  assert upstream.FORMAT_VERSION >= 2
  monkeypatch.setattr(upstream, "FORMAT_VERSION", 1)
  assert upstream.content_key(config) != key
