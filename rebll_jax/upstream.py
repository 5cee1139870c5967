r"""Upstream pretraining: the embedded stand-in for ImageNet weights.

  python -m rebll_jax.upstream                       # into the cache
  python -m rebll_jax.upstream --out weights/upstream  # and/or a folder

Every published MLCIL number fine-tunes a backbone pretrained on a large
upstream dataset. Offline, with no weights to download, this module draws an
upstream dataset from the synthetic renderer (``synthetic.upstream_classes``:
64 (shape, texture, colour) classes, none of them a benchmark class), trains
the run's small ResNet on it jointly (multi-label, every label known, BCE;
the project's own jitted train step with the ``joint`` method) and saves the
backbone in the format of converted weights (``models/pretrained.py``:
``info.json`` + ``variables/``, head dropped), so
``--config.model.init_from=DIR`` loads it like a converted ImageNet model.

A run asks for it with ``--config.model.init_from=upstream:auto`` (the
``pretrained_*`` settings of configs/synthetic.py do): ``resolve_init_from``
maps that to ``CACHE/upstream/KEY``, where KEY is a hash of everything the
pretraining reads (the ``upstream`` config block, the model's shape, image
size and input normalisation, FORMAT_VERSION). The first run that needs
it trains it (about 2 minutes on 2 idle CPU cores) under a file lock; every
later run reuses it. CACHE is ``$REBLL_JAX_CACHE`` or ``~/.cache/rebll_jax``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import time

import ml_collections
import numpy as np

from rebll_jax import host_malloc, preemption
from rebll_jax.errors import UserError

log = logging.getLogger("rebll_jax")

AUTO = "upstream:auto"
# Bump when the upstream renderer or training loop changes its numbers, so
# old cache entries are not reused. 2 (2026-12-07): until then pretraining
# read the whole run config, so a _field setting or an overridden recipe
# trained another backbone under the plain setting's key; a version-1 entry
# may be such a backbone.
FORMAT_VERSION = 2
CACHE_ENV = "REBLL_JAX_CACHE"


def default_config() -> ml_collections.ConfigDict:
  """The upstream pretraining budget (about 2 minutes on 2 idle CPU cores)."""
  u = ml_collections.ConfigDict()
  u.num_classes = 64  # a prefix of synthetic.upstream_classes()
  u.num_train = 6000
  u.num_test = 600  # held out: the upstream mAP recorded in info.json
  u.seed = 4242  # image seed (the benchmark uses 1234 / 1235)
  u.render_size = 64
  u.epochs = 12
  u.global_batch = 64
  u.lr = 3e-3  # Adam, one-cycle: the from-scratch recipe of the benchmark
  u.weight_decay = 1e-4
  u.train_seed = 0
  # Its own augmentation (the synthetic defaults), so that a fine-tuning
  # run's augment overrides do not ask for another upstream model.
  u.flip = True
  u.cutout = 0.25
  return u


# ------------------------------------------------------------- the key ---

def _pretrain_inputs(config) -> dict:
  """Everything the pretraining of ``config``'s backbone depends on."""
  up = config.get("upstream") or default_config()
  m = config.model
  return {"format_version": FORMAT_VERSION,
          "upstream": up.to_dict(),
          "model": {"arch": m.arch, "width": m.width,
                    "stage_sizes": list(m.stage_sizes),
                    "stem_stride": m.stem_stride, "dtype": m.dtype},
          "image_size": config.data.image_size,
          "normalize": bool(config.data.normalize)}


def content_key(config) -> str:
  text = json.dumps(_pretrain_inputs(config), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_root() -> str:
  root = os.environ.get(CACHE_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "rebll_jax")
  return os.path.join(os.path.abspath(root), "upstream")


def cache_dir(config) -> str:
  return os.path.join(cache_root(), content_key(config))


def _complete(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, "info.json"))


@contextlib.contextmanager
def _locked(path: str, fix: str = "choose another folder"):
  """Holds an exclusive lock on ``path``, making its folder first. A folder
  that cannot be made or written (a file on the way, no permission) is a
  UserError whose message ends with ``fix``."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    f = open(path, "w")  # pylint: disable=consider-using-with
  except OSError as e:
    blocker = os.path.dirname(path)
    while blocker and not os.path.lexists(blocker):
      blocker = os.path.dirname(blocker)
    why = (f"{blocker} is a file, not a folder"
           if blocker and not os.path.isdir(blocker)
           else f"{e.strerror or type(e).__name__} ({e.filename or path})")
    raise UserError(f"cannot write the upstream backbone's lock {path}: "
                    f"{why}; {fix}") from None
  with f:
    fcntl.flock(f, fcntl.LOCK_EX)  # a second run waits for the first
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def resolve_init_from(config, pretrain: bool = True) -> str | None:
  """``config.model.init_from``, with ``upstream:auto`` made a directory.

  Any other value is returned unchanged. For ``upstream:auto`` the cached
  checkpoint of this config's content key is returned, pretrained first if
  the cache does not hold it yet; with ``pretrain=False`` only the value is
  checked and None returned (a dry run trains nothing).
  """
  init_from = config.model.init_from
  if init_from != AUTO:
    if init_from.startswith("upstream:"):
      raise UserError(f"model.init_from={init_from!r}: the only upstream "
                      f"value is {AUTO!r} (or pass a checkpoint directory)")
    return init_from
  if config.model.arch != "small_resnet":
    raise UserError(f"model.init_from={AUTO!r} pretrains the synthetic "
                    f"benchmark's small_resnet, not {config.model.arch!r}; "
                    "for real backbones convert real weights "
                    "(python -m rebll_jax.convert)")
  return ensure(config) if pretrain else None


def _staging_dirs(directory: str) -> list[str]:
  """``directory``'s half-written copies (``DIR.tmpPID``)."""
  parent, name = os.path.split(directory)
  if not os.path.isdir(parent):
    return []
  return [os.path.join(parent, entry) for entry in os.listdir(parent)
          if re.fullmatch(re.escape(name) + r"\.tmp\d+", entry)]


def ensure(config, out_dir: str | None = None) -> str:
  """The checkpoint directory of ``config``'s upstream backbone; trains and
  writes it (atomically, under a lock) unless it is already there."""
  directory = os.path.abspath(out_dir or cache_dir(config))
  if _complete(directory):
    return directory
  with _locked(directory + ".lock",
               "choose another --out" if out_dir else
               f"set ${CACHE_ENV} to a folder you can write"):
    if _complete(directory):  # made by a concurrent run while we waited
      return directory
    if os.path.exists(directory):
      raise UserError(f"{directory} exists but holds no info.json; remove it "
                      "or choose another --out")
    # Only the lock holder writes a staging copy: any there now is a killed
    # run's (SIGKILL, SIGTERM, power), which nothing else would remove.
    for stale in _staging_dirs(directory):
      shutil.rmtree(stale, ignore_errors=True)
    log.info("pretraining the upstream backbone (once, cached): %s",
             directory)
    staging = f"{directory}.tmp{os.getpid()}"
    try:
      pretrain(config, staging)
      os.replace(staging, directory)
    finally:
      shutil.rmtree(staging, ignore_errors=True)  # gone after the rename
  return directory


# ------------------------------------------------------------ training ---

def _upstream_data(up, image_size: int):
  from rebll_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  train = synthetic.generate_upstream(up.num_train, up.seed, up.render_size,
                                      up.num_classes)
  test = synthetic.generate_upstream(up.num_test, up.seed + 1,
                                     up.render_size, up.num_classes)
  return [(synthetic._resize(images, image_size), labels)  # pylint: disable=protected-access
          for images, labels in (train, test)]


# Model fields pretraining takes from the run config besides the keyed ones
# (``_pretrain_inputs``): kernel choices, which change no value beyond
# float32 rounding.
_KERNEL_CHOICES = ("conv_impl", "norm_impl", "cpu_library_fusion",
                   "cpu_scheduler")


def _train_config(config):
  """The config the jitted train step reads while pretraining: the base
  config with the keyed inputs of ``config`` and the pretraining recipe.

  Nothing else of ``config`` reaches it. It used to be ``config`` itself,
  so that a ``_field`` setting's augmentation, Adam beta1 cycle or loss
  scaling trained another backbone under the same cache key as the plain
  setting's, and whichever ran first was reused by the other."""
  from rebll_jax import config_base  # pylint: disable=g-import-not-at-top
  up = config.get("upstream") or default_config()
  c = config_base.base_config()
  for field in ("arch", "width", "stage_sizes", "stem_stride", "dtype",
                *_KERNEL_CHOICES):
    c.model[field] = config.model[field]
  c.data.image_size = config.data.image_size
  c.data.normalize = config.data.normalize
  c.method = "joint"
  c.optim.name = "adam"
  c.optim.lr_first = up.lr
  c.optim.weight_decay = up.weight_decay
  c.optim.schedule = "one_cycle"
  c.train.global_batch = up.global_batch
  c.augment.flip = up.flip
  c.augment.cutout = up.cutout
  c.augment.randaugment_ops = 0
  c.debug.nan_at_step = -1
  c.model.init_from = ""
  return c, up


def pretrain(config, out_dir: str) -> dict:
  """Trains the upstream backbone of ``config`` and saves it to ``out_dir``.

  Returns the info dict written to ``out_dir/info.json``.
  """
  # Deferred: the CLI's --help and the key functions need no jax.
  import jax  # pylint: disable=g-import-not-at-top
  from rebll_jax import methods, metrics, models, optim, protocol, steps, xla_cpu  # pylint: disable=g-import-not-at-top,line-too-long
  from rebll_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from rebll_jax.models import pretrained  # pylint: disable=g-import-not-at-top

  started = time.time()
  cfg, up = _train_config(config)
  (train_x, train_y), (test_x, test_y) = _upstream_data(
      up, cfg.data.image_size)
  render_seconds = time.time() - started
  num_classes = up.num_classes
  model = models.build_model(cfg.model, num_classes)
  size = cfg.data.image_size
  root = jax.random.key(up.train_seed)
  variables = models.init_variables(model, jax.random.fold_in(root, 0), size)
  tx = optim.make_transform(cfg.optim)
  state = steps.initial_train_state(tx, variables)
  batch_size = min(up.global_batch, len(train_x))
  steps_per_epoch = len(train_x) // batch_size
  total = up.epochs * steps_per_epoch
  task = protocol.make_tasks(num_classes, num_classes, num_classes)[0]
  context = steps.task_context(task, task_start=0, total_steps=total,
                               lr_peak=up.lr)
  step_fn = jax.jit(steps.make_train_step(
      model=model, method=methods.get_method("joint"), config=cfg, tx=tx,
      has_old=False), donate_argnums=0,
      compiler_options=xla_cpu.options_for(cfg.model))
  rng = np.random.default_rng(up.train_seed)
  known = np.ones((batch_size, num_classes), bool)
  not_memory = np.zeros((batch_size,), bool)
  losses = []
  for epoch in range(up.epochs):
    order = rng.permutation(len(train_x))
    for b in range(steps_per_epoch):
      rows = np.sort(order[b * batch_size:(b + 1) * batch_size])
      labels = train_y[rows]
      batch = {"images": train_x[rows], "labels": labels.astype(np.float32),
               "known": known, "is_memory": not_memory}
      state, out = step_fn(state, None, batch, context, root)
    losses.append(float(out["loss"]))
    log.info("upstream epoch %d/%d: loss %.4f", epoch + 1, up.epochs,
             losses[-1])
  if not np.all(np.isfinite(losses)):
    raise RuntimeError(f"upstream pretraining diverged: losses {losses}")
  train_seconds = time.time() - started - render_seconds

  variables = steps.variables_of(state)
  predict = jax.jit(steps.make_predict(model, cfg.data.normalize),
                    compiler_options=xla_cpu.options_for(cfg.model))
  scores = np.concatenate([
      np.asarray(predict(variables, test_x[i:i + 256])[0])
      for i in range(0, len(test_x), 256)])
  test_map = metrics.mean_ap(scores, test_y)

  params = {k: v for k, v in variables["params"].items() if k != "head"}
  backbone = jax.tree.map(lambda a: np.asarray(a, np.float32),
                          {"params": params,
                           "batch_stats": variables["batch_stats"]})
  leaves = jax.tree.leaves(backbone)
  head = variables["params"]["head"]
  info = {
      "arch": cfg.model.arch, "format": "upstream-pretrained",
      "converter": "rebll_jax.upstream", "content_key": content_key(config),
      "num_tensors": len(leaves),
      "num_values": int(sum(a.size for a in leaves)),
      "dropped": {"classifier head": [
          f"head.{k} {list(np.shape(v))}" for k, v in sorted(head.items())]},
      "num_classes": 0,
      "pretrain_inputs": _pretrain_inputs(config),
      "upstream_classes": list(synthetic.upstream_class_names(num_classes)),
      "upstream_test_map": test_map,
      "epoch_losses": losses, "steps": total,
      "render_seconds": render_seconds, "train_seconds": train_seconds,
  }
  pretrained.save_converted(out_dir, backbone, info)
  log.info("upstream backbone: held-out upstream mAP %.1f after %d steps "
           "(%.0f s rendering, %.0f s training)", test_map, total,
           render_seconds, train_seconds)
  return info


# ----------------------------------------------------------------- CLI ---

def load_config(spec: str):
  """``FILE[:SETTING]`` -> the config its ``get_config(SETTING)`` returns.

  Loaded as the training CLI loads ``--config`` (``rebll_jax.main``): a file
  that is missing, fails to import, raises, or returns anything but a
  ConfigDict is a UserError on one line, never a traceback; the config is
  then checked field by field (``config_checks.check_values``) as a run's is.
  """
  path = spec.partition(":")[0]
  if os.path.isfile(path) and importlib.util.spec_from_file_location(
      "_run_config", path) is None:  # not a .py file: nothing to import
    raise UserError(f"--config {path}: not a Python config file (.py)")
  # pylint: disable=g-import-not-at-top
  from rebll_jax import config_checks
  from rebll_jax import main as run_cli
  config = run_cli.build_config([f"--config={spec}"])
  config_checks.check_values(config)
  return config


def _check_key(directory: str, key: str, spec: str):
  """UserError unless ``directory`` holds the upstream backbone of ``key``:
  an existing --out is reused as it is, so it must be this config's."""
  path = os.path.join(directory, "info.json")
  try:
    with open(path) as f:
      have = json.load(f).get("content_key")
  except (OSError, ValueError, AttributeError) as e:
    raise UserError(f"--out {directory}: {path} is unreadable "
                    f"({type(e).__name__}); choose another directory") from None
  if have != key:
    raise UserError(f"--out {directory} holds the upstream backbone of "
                    f"another config (key {have}; --config {spec} has key "
                    f"{key}); choose another directory")


STOPPED = ("nothing half-written is kept; the same command pretrains it "
           "again")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m rebll_jax.upstream", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/synthetic.py:pretrained_b0c4",
                      help="the run config whose backbone to pretrain "
                      "(its model shape and `upstream` block)")
  parser.add_argument("--out", default="",
                      help="directory to write (default: the cache entry "
                      "that --config.model.init_from=upstream:auto reads)")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  # Our progress lines only, not the libraries' INFO chatter (orbax).
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(message)s"))
  log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False
  try:
    config = load_config(args.config)
    if config.model.arch != "small_resnet":
      raise UserError(f"--config {args.config}: model.arch is "
                      f"{config.model.arch!r}; upstream pretraining is for "
                      "the synthetic benchmark's small_resnet")
    if args.out and os.path.exists(args.out) and not _complete(args.out):
      raise UserError(f"--out {args.out} exists and is not an upstream "
                      "checkpoint; choose another directory")
    if args.out and _complete(args.out):
      _check_key(args.out, content_key(config), args.config)
    try:  # process-wide, as a run does (rebll_jax/host_malloc.py)
      host_malloc.apply(config.get("host_malloc", "retain"), log)
    except ValueError as e:
      raise UserError(f"--config {args.config}: {e}") from None
    started = time.time()
    # (this run's staging copy is removed on the way out)
    directory, stopped = preemption.call_stoppable(
        lambda: ensure(config, args.out or None), STOPPED)
  except UserError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  if stopped:
    return stopped
  with open(os.path.join(directory, "info.json")) as f:
    info = json.load(f)
  print(f"upstream backbone ({info['content_key']}): {directory}\n"
        f"  {len(info['upstream_classes'])} classes, held-out upstream mAP "
        f"{info['upstream_test_map']:.1f}, {info['steps']} steps; "
        f"{time.time() - started:.0f} s now (0 if it was cached)\n"
        f"  train from it with --config.model.init_from={directory}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
