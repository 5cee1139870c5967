"""Protocol dry run (``--config.dry_run=True``): what a run would train on.

Builds the data source and the protocol exactly as a run does, writes
``protocol.json`` into the workdir and returns it; the CLI prints ``table``.
A run writes the same file (``plan``, ``write_protocol``) when it starts.
No model is built, nothing is compiled, no image is decoded (sources load
labels and ids without reading images; the run's data digest, which reads a
few, is not computed).

``protocol.json``: ``dataset``, ``setting``, ``method``, ``class_order``,
the two protocol switches (``memory_future_labels``,
``keep_crowd_only_images``), ``evaluation_split`` (``test``, or ``val`` under
``data.val_fraction``: the split every ``*test*`` field then holds) and
``tasks``, one entry per task with ``task``
(1-based), ``classes`` (names), ``train_image_ids`` and ``test_image_ids``
(the dataset's own ids, in split order: COCO's integer ids, VOC's file
stems), their counts, the memory budget after the task, and how many
images of the task's classes hold them only as crowd boxes (kept in the
id lists only with ``keep_crowd_only_images``).
"""

from __future__ import annotations

import json
import os

from rebll_jax import checkpoint
from rebll_jax import memory as memory_lib
from rebll_jax import methods, protocol, run_identity, validate
from rebll_jax.errors import UserError

VOC_SOURCES = ("voc2007", "tfds_voc2007")


def dataset_ids(source, split) -> list:
  """The dataset's own id of every row: the split's ``dataset_ids`` when it
  has them, else VOC's six-digit stems or the integer ids."""
  ids = getattr(split, "dataset_ids", None)
  if ids is not None:
    return list(ids)
  if source.name in VOC_SOURCES:
    return [f"{int(i):06d}" for i in split.image_ids]
  return [int(i) for i in split.image_ids]


def memory_budget(config, method, task, num_train_images: int) -> int:
  """Exemplar slots over the classes seen after ``task`` (0 without
  replay): what the buffer may hold when the task ends, at most its
  capacity (``memory.capacity_for``: no more rows than the training images
  can fill)."""
  if not method.replay:
    return 0
  quotas = memory_lib.class_quotas(
      task.seen, num_classes=task.num_classes,
      per_class=config.memory.per_class, total=config.memory.total)
  capacity = memory_lib.capacity_for(
      num_classes=task.num_classes, per_class=config.memory.per_class,
      total=config.memory.total, num_images=num_train_images,
      dedup=config.memory.dedup)
  return min(int(quotas.sum()), capacity)


def _crowd_only(split, classes) -> int:
  """Images holding ``classes`` only as crowd boxes (kept or not)."""
  crowd = getattr(split, "crowd_labels", None)
  if crowd is None:
    return 0
  with_crowd = protocol.scored_rows(split.labels, classes, crowd)
  return int(with_crowd.size - protocol.scored_rows(split.labels,
                                                    classes).size)


def plan(config, source, method, tasks) -> dict:
  """The protocol as a run would follow it (the content of protocol.json)."""
  train_ids = dataset_ids(source, source.train)
  test_ids = dataset_ids(source, source.test)
  entries = []
  for task in tasks:
    view = protocol.train_view(source, task.classes, config.protocol)
    rows = protocol.eval_rows(source, task.seen, config.protocol)
    entries.append({
        "task": task.index + 1,
        "classes": [source.class_names[c] for c in task.classes],
        "num_train_images": len(view),
        "num_test_images": int(rows.size),
        "memory_budget": memory_budget(config, method, task,
                                       len(source.train)),
        "crowd_only_train_images": _crowd_only(source.train, task.classes),
        "crowd_only_test_images": _crowd_only(source.test, task.seen),
        "train_image_ids": [train_ids[i] for i in view.indices.tolist()],
        "test_image_ids": [test_ids[i] for i in rows.tolist()],
    })
  return {
      "dataset": source.name,
      "setting": ("joint" if method.joint else protocol.setting_name(
          config.protocol.base, config.protocol.increment)),
      "method": config.method,
      "class_order": list(source.class_names),
      "num_train_images": len(source.train),
      "num_test_images": len(source.test),
      # What the *_test_* fields hold: the split a run scores each task on.
      "evaluation_split": "val" if config.data.get("val_fraction", 0) > 0
                          else "test",
      "memory_future_labels": config.protocol.memory_future_labels,
      "keep_crowd_only_images": bool(config.protocol.keep_crowd_only_images),
      "tasks": entries,
  }


def _dumps(result: dict) -> str:
  """JSON with one line per top-level field and per task (the id lists of
  full COCO are a few MB: one id per line would be millions of lines)."""
  lines = []
  for key, value in result.items():
    if key == "tasks":
      tasks = ",\n  ".join(json.dumps(t) for t in value)
      lines.append(f' "tasks": [\n  {tasks}\n ]')
    else:
      lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
  return "{\n" + ",\n".join(lines) + "\n}\n"


def run(config, workdir: str, setting=None) -> dict:
  """Checks the config, builds the source and protocol, writes
  ``workdir/protocol.json``; returns its content."""
  validate.check_config(config, setting)
  validate.check_init_from(config, pretrain=False)
  validate.check_workdir(workdir)
  _check_no_other_run(config, workdir)
  method = methods.get_method(config.method)
  source = validate.build_source(config.data)
  _check_same_data(config, source, workdir)
  validate.check_protocol(config, source.num_classes)
  tasks = method.tasks(source.num_classes, config.protocol)
  validate.check_tasks(source, tasks, config.protocol)
  result = plan(config, source, method, tasks)
  write_protocol(workdir, result)
  return result


def write_protocol(workdir: str, result: dict):
  """``result`` (``plan``'s) as ``workdir/protocol.json``. A run writes it
  too when it starts, so an extended run's file names its new tasks."""
  path = os.path.join(workdir, "protocol.json")
  # A kill never leaves half a file; the pid keeps two dry runs of one
  # workdir (a dry run takes no workdir lock) out of each other's file.
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(_dumps(result))
  os.replace(tmp, path)


def _described(config) -> dict:
  """What protocol.json describes of a config: its fingerprinted fields and
  the number of tasks (a resume may extend a run, but a table of 1 task
  beside a 3-task run's results is not that run's)."""
  flat = run_identity.flatten(config)
  return {**run_identity.config_fields(config),
          "protocol.num_tasks": flat.get("protocol.num_tasks")}


def _check_no_other_run(config, workdir: str):
  """Refuses a workdir whose run (its config.json) is another config: the
  protocol.json written beside that run's results would not describe it.
  The run's own workdir is fine (check a protocol before, or after)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as e:
    raise UserError(f"workdir {workdir} holds a config.json that cannot be "
                    f"read ({' '.join(str(e).split())}); dry-run in another "
                    "--workdir") from None
  diffs = run_identity.differences(
      {"config": _described(saved)}, {"config": _described(config)},
      saved_name="the run")
  if diffs:
    raise UserError(
        f"workdir {workdir} holds another run ({run_identity.listing(diffs)})"
        "; its protocol.json would sit beside that run's results: dry-run "
        "this config in another --workdir")


def _check_same_data(config, source, workdir: str):
  """Refuses a workdir whose run (its newest checkpoint) trained on other
  data: config.json cannot tell (``data.data_dir`` may change on resume;
  the run's data digest covers the content), or with another config (its
  fingerprinted fields: config.json may have been deleted). Computes the
  digest, which reads a few images, only where a checkpoint exists."""
  saved = checkpoint.peek_fingerprint(os.path.join(workdir, "checkpoints"))
  if saved is None:
    return
  current = {"dataset": source.name,
             "class_order": list(source.class_names),
             "data_digest": run_identity.data_digest(source),
             "crowd_digest": run_identity.crowd_digest(source),
             # Also when config.json is gone: the checkpoint holds the rest.
             "config": run_identity.config_fields(config)}
  diffs = run_identity.differences(saved, current, saved_name="the run")
  if diffs:
    raise UserError(
        f"workdir {workdir} holds a run on other data or settings "
        f"({run_identity.listing(diffs)}); its protocol.json would sit "
        "beside that run's results: dry-run this config in another "
        "--workdir")


def _classes_cell(names, width: int = 44) -> str:
  text = ", ".join(names)
  if len(text) <= width:
    return text
  shown = []
  for name in names:
    if len(", ".join(shown + [name])) > width - 12:
      break
    shown.append(name)
  return f"{', '.join(shown)}, ... ({len(names)})"


def table(result: dict) -> str:
  """The per-task table the CLI prints."""
  split = result.get("evaluation_split", "test")
  head = (f"{result['dataset']} {result['setting']}: "
          f"{len(result['class_order'])} classes, "
          f"{result['num_train_images']} train / "
          f"{result['num_test_images']} {split} images; "
          f"memory_future_labels={result['memory_future_labels']}, "
          f"keep_crowd_only_images={result['keep_crowd_only_images']}")
  rows = [("task", "classes", "train", split, "memory", "crowd-only")]
  for t in result["tasks"]:
    rows.append((str(t["task"]), _classes_cell(t["classes"]),
                 str(t["num_train_images"]), str(t["num_test_images"]),
                 str(t["memory_budget"]),
                 f"{t['crowd_only_train_images']}/"
                 f"{t['crowd_only_test_images']}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = [head]
  for r in rows:
    cells = [r[0].rjust(widths[0]), r[1].ljust(widths[1])]
    cells += [c.rjust(w) for c, w in zip(r[2:], widths[2:])]
    lines.append("  ".join(cells).rstrip())
  lines.append(f"crowd-only: train / {split} images holding the task's (seen) "
               "classes only as crowd boxes"
               + ("" if result["keep_crowd_only_images"]
                  else " (left out of the counts above)"))
  return "\n".join(lines)

