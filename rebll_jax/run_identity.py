"""What makes a run the same run: the fingerprint a resume must match.

Every config field is part of the run's identity except the few on
``MAY_CHANGE_ON_RESUME``: how the run is executed and observed (devices,
processes, logging, checkpoint cadence), where inputs live (paths: the data
digest and the checkpoint cover the content), and what a user may extend
(later tasks' epochs and learning rate, the number of tasks). A field added
to the config later is fingerprinted unless someone puts it on the list, so
nothing slips through by omission.

On top of the config, the fingerprint holds what the config does not say:
the data's digest (another synthetic seed or another folder under the same
name is another dataset), the class order and the replay buffer's size.
"""

from __future__ import annotations

import json
import zlib

import numpy as np

from rebll_jax import methods
from rebll_jax.errors import UserError

# Dotted config fields (or whole sections, ending in ".") that may differ
# between the run that saved a checkpoint and the run that resumes it.
MAY_CHANGE_ON_RESUME = (
    "resume", "distributed", "dist.", "num_devices", "cpu_devices",  # machine
    "data.num_workers", "data.data_dir",  # host threads; where data lives
    "model.init_from",  # used at init only; the checkpoint holds the weights
    # Kernel choices: the same function to float32 rounding, like
    # num_devices (and a run saved before the field existed can resume).
    "model.cpu_library_fusion", "model.norm_impl", "model.cpu_scheduler",
    "host_malloc",  # where host memory comes from, never a value
    "train.progress", "train.log_every", "train.label_diagnostics",  # logs
    "train.checkpoint_every", "train.keep_checkpoints",  # cadence
    "train.epochs_later", "optim.lr_later", "protocol.num_tasks",  # extend
    "debug.",  # fault injection for tests
    "dry_run",
)


# Fields added after checkpoints were written without them: the value that
# reproduces what the code did before the field existed. A checkpoint that
# lacks the field matches a run with this value (and no other).
VALUE_BEFORE_THE_FIELD = {
    "model.head_rows": "kept",
    "train.ddp_processes": 1,
    "train.last_batch": "drop",
    "optim.loss_scale": "none",
}


def matches(field: str, patterns) -> bool:
  """Whether dotted ``field`` is one of ``patterns`` (a name, or a section
  ending in ".")."""
  return any(field == p or (p.endswith(".") and field.startswith(p))
             for p in patterns)


def may_change(field: str) -> bool:
  return matches(field, MAY_CHANGE_ON_RESUME)


def may_change_values(config) -> dict:
  """{field: value} of the fields on ``MAY_CHANGE_ON_RESUME``: what the
  fingerprint leaves out, and so what a checkpoint records of the process
  that saved it (see ``train.RunState.trained_with``)."""
  return {k: v for k, v in flatten(config).items() if may_change(k)}


def with_values(config_json: dict, values: dict) -> dict:
  """``config_json`` (nested, as ``to_json_best_effort`` gives it) with the
  dotted ``values`` put in; the input is not modified."""
  out = json.loads(json.dumps(config_json))
  for field, value in values.items():
    *sections, key = field.split(".")
    node = out
    for name in sections:
      node = node.setdefault(name, {})
    node[key] = value
  return out


def flatten(config, prefix: str = "") -> dict:
  """{dotted field: value} of a ConfigDict (tuples as lists, JSON-like)."""
  out = {}
  for key in sorted(config.keys()):
    value = config[key]
    name = f"{prefix}{key}"
    if hasattr(value, "keys"):
      out.update(flatten(value, name + "."))
    else:
      out[name] = list(value) if isinstance(value, tuple) else value
  return out


def data_digest(source) -> str:
  """CRC-32 of the labels and ids of both splits and of a few images."""
  crc = 0
  for split in (source.train, source.test):
    for array in (split.labels, split.image_ids,
                  split.read_images(np.arange(min(4, len(split))))):
      crc = zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1),
                       crc)
  return f"{crc:08x}"


def crowd_digest(source) -> str:
  """CRC-32 of both splits' crowd-only classes (COCO crowd boxes: what
  ``protocol.keep_crowd_only_images`` puts in a task's view); all zeros for
  VOC and synthetic data. Not in ``data_digest``, which checkpoints written
  before it keep."""
  crc = 0
  for split in (source.train, source.test):
    crc = zlib.crc32(np.ascontiguousarray(split.crowd_labels).view(
        np.uint8).reshape(-1), crc)
  return f"{crc:08x}"


# Fingerprint entries added after checkpoints were written without them: a
# checkpoint that lacks one is not compared on it (it cannot say).
ADDED_LATER = ("crowd_digest", "method_definition")

# Methods whose definition changed before checkpoints recorded it: a
# checkpoint of one without a recorded definition ran the old one.
REDEFINED = {"ft": "on 2026-12-08 `ft` became METHOD.md's fine-tuning "
                   "(unknown labels taken as negatives); the old one is "
                   "`ft_masked`: start that run again in a new --workdir"}


def fingerprint(config, source, memory_capacity: int) -> dict:
  """The identity a checkpoint must agree on to be resumed by this run."""
  fields = config_fields(config)
  return {"dataset": source.name, "data_digest": data_digest(source),
          "crowd_digest": crowd_digest(source),
          "class_order": list(source.class_names),
          "memory_capacity": int(memory_capacity), "config": fields,
          "method_definition": methods.definition(config.get("method", ""))}


def differences(saved: dict, current: dict,
                saved_name: str = "checkpoint") -> list[str]:
  """Human-readable differences, config fields one by one (``saved_name``:
  what the saved side is called in them)."""
  diffs = []
  for key, value in current.items():
    if key == "config":
      old = {**{k: v for k, v in VALUE_BEFORE_THE_FIELD.items()
                if k in value}, **saved.get("config", {})}
      for field in sorted(set(value) | set(old)):
        if old.get(field, "<absent>") != value.get(field, "<absent>"):
          diffs.append(f"{field}: {saved_name} {old.get(field, '<absent>')!r} "
                       f"vs config {value.get(field, '<absent>')!r}")
    elif key in ADDED_LATER and key not in saved:
      method = saved.get("config", {}).get("method")
      if key == "method_definition" and method in REDEFINED:
        diffs.append(f"method_definition: {REDEFINED[method]}")
      continue
    elif saved.get(key) != value:
      diffs.append(f"{key}: {saved_name} {saved.get(key)!r} vs config "
                   f"{value!r}")
  return diffs


def listing(diffs: list[str], most: int = 6) -> str:
  """The first ``most`` differences, then how many more."""
  return "; ".join(diffs[:most]) + (f"; and {len(diffs) - most} more"
                                    if len(diffs) > most else "")


def config_fields(config) -> dict:
  """The fingerprinted config fields of a ConfigDict or of its JSON (a
  workdir's config.json)."""
  return {k: v for k, v in flatten(config).items() if not may_change(k)}


def check(saved: dict, current: dict, workdir: str):
  """UserError unless the checkpoint's fingerprint matches this run's."""
  diffs = differences(saved, current)
  if diffs:
    raise UserError(
        f"workdir {workdir} holds a checkpoint of another run "
        f"({listing(diffs)}); "
        "run this config in a new --workdir, or rerun with the checkpoint's "
        "settings to resume it (fields that may change on resume: "
        f"{', '.join(MAY_CHANGE_ON_RESUME)})")
