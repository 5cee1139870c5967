"""The task loop: ``run(config, workdir) -> results``.

For each task: build its partial view (plus replay rows), train with one
jitted data-parallel step, evaluate on the seen classes, update the replay
memory and relabel it, checkpoint. Rerunning on the same workdir resumes from
the newest checkpoint (the end of a task, or a mid-task save).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from rebll_jax import checkpoint, methods, metrics, models, optim
from rebll_jax import memory as memory_lib
from rebll_jax import parallel, protocol, relabel, replay, reporting, steps
from rebll_jax import upstream, validate
from rebll_jax.data import loader
from rebll_jax.models import pretrained
from rebll_jax.errors import UserError

log = logging.getLogger("rebll_jax")


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or inf; the last good checkpoint is kept.

  Every step's loss is checked on the device (a running "first bad step"
  scalar, no host sync); the host reads it at log steps and before every
  save, so a state trained through a non-finite loss is never checkpointed.
  """


def _versions() -> dict:
  import flax, orbax.checkpoint, grain  # pylint: disable=g-import-not-at-top,multiple-imports
  from rebll_jax import __version__  # pylint: disable=g-import-not-at-top
  return {"rebll_jax": __version__, "jax": jax.__version__,
          "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__")
          else jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "numpy": np.__version__,
          "orbax": orbax.checkpoint.__version__,
          "grain": getattr(grain, "__version__", "unknown")}


def _data_digest(source) -> str:
  """CRC-32 of the labels and ids of both splits and of a few images: the
  same dataset name with other contents (another synthetic seed, another
  folder) is another dataset."""
  crc = 0
  for split in (source.train, source.test):
    for array in (split.labels, split.image_ids,
                  split.read_images(np.arange(min(4, len(split))))):
      crc = zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1),
                       crc)
  return f"{crc:08x}"


def _fingerprint(config, source, memory_capacity) -> dict:
  """What a checkpoint must agree on to be resumed by this run.

  The run's identity (data, protocol, method, seed) and everything that
  shapes the saved arrays (model, optimizer, buffer size). Learning rates,
  epochs of later tasks, num_tasks and devices may change on resume.
  """
  m = config.model
  return {"dataset": source.name, "data_digest": _data_digest(source),
          "class_order": list(source.class_names),
          "setting": protocol.setting_name(config.protocol.base,
                                           config.protocol.increment),
          "method": config.method,
          "arch": m.arch, "image_size": config.data.image_size,
          "model_shape": f"width={m.width} stages={tuple(m.stage_sizes)} "
                         f"stem_stride={m.stem_stride}",
          "optimizer": config.optim.name,
          "memory_capacity": int(memory_capacity),
          "seed": config.seed}


def _check_fingerprint(saved: dict, current: dict, workdir: str):
  diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {v!r}"
           for k, v in current.items() if saved.get(k) != v]
  if diffs:
    raise UserError(
        f"workdir {workdir} holds a checkpoint of another run ("
        + "; ".join(diffs) + "); run this config in a new --workdir, or "
        "rerun with the checkpoint's settings to resume it")


def _trim_metrics(workdir: str, global_step: int):
  """Drops metrics.jsonl lines past the resumed step (a killed run's tail)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= global_step:
          keep.append(line)
      except (ValueError, KeyError, TypeError):
        pass  # a line cut by the kill
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


def _host(tree):
  """Device arrays -> numpy on every process (gathers across hosts)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, tree)


class Predictor:
  """Sharded inference over a split: scores and pooled features."""

  def __init__(self, model, config, mesh):
    self.mesh = mesh
    self.batch = config.train.eval_batch
    self.fn = jax.jit(steps.make_predict(model, config.data.normalize),
                      out_shardings=parallel.replicated(mesh))

  def __call__(self, variables, split, indices):
    scores, features = [], []
    rows = parallel.local_batch_slice(self.batch)
    for images, valid in loader.eval_batches(split, indices, self.batch):
      batch = parallel.to_global(self.mesh, images[rows])
      s, f = _host(self.fn(variables, batch))
      scores.append(s[:valid])
      features.append(f[:valid])
    if not scores:
      return np.zeros((0, 0)), np.zeros((0, 0))
    return np.concatenate(scores), np.concatenate(features)


def _evaluate(predictor, variables, source, task, tasks, threshold):
  """mAP on the seen classes after ``task``, plus per-task and F1 stats."""
  view_rows = np.flatnonzero(source.test.labels[:, task.seen].any(axis=1))
  scores, _ = predictor(variables, source.test, view_rows)
  targets = source.test.labels[view_rows]
  per_task = [metrics.mean_ap(scores, targets, t.classes)
              for t in tasks[:task.index + 1]]
  seen_scores, seen_targets = scores[:, task.seen], targets[:, task.seen]
  return {"map_seen": metrics.mean_ap(seen_scores, seen_targets),
          "map_per_task": per_task,
          "calibration": metrics.calibration(
              scores, targets, old_classes=np.flatnonzero(task.old_mask),
              current_classes=task.classes),
          **metrics.f1_scores(seen_scores, seen_targets, threshold)}


def _memory_tree(memory):
  # Orbax cannot save zero-size arrays: no buffer, no entry.
  return memory_lib.to_state(memory) if memory.capacity else {}


def _make_tasks(config, method, num_classes):
  if method.joint:
    return protocol.make_tasks(num_classes, num_classes, num_classes)
  return protocol.make_tasks(num_classes, config.protocol.base,
                             config.protocol.increment,
                             config.protocol.num_tasks)


def _rates(stats: dict) -> dict:
  """FPR / FNR (percent) from summed tp/fp/tn/fn counts; never NaN."""
  q = relabel.quality_from_counts(stats)
  return {"fpr": 100 * q["fpr"], "fnr": 100 * q["fnr"], "count": q["count"]}


def run(config, workdir: str) -> dict:
  """Trains every task of ``config`` in ``workdir``; returns results."""
  validate.check_config(config)
  validate.check_workdir(workdir)
  if config.distributed:
    parallel.initialize_distributed(config.dist)
  method = methods.get_method(config.method)
  source = validate.build_source(config.data)
  tasks = _make_tasks(config, method, source.num_classes)
  mesh = parallel.make_mesh(config.num_devices)
  validate.check_devices(config, mesh.size, jax.process_count())
  validate.check_tasks(source, tasks)
  num_classes = source.num_classes
  is_chief = jax.process_index() == 0

  model = models.build_model(config.model, num_classes)
  root = jax.random.key(config.seed)
  size = config.data.image_size
  # Jitted: an op-by-op init of a deep net costs far more than compiling it.
  variables = jax.jit(model.init, static_argnames="train")(
      jax.random.fold_in(root, 0), jnp.zeros((1, size, size, 3)), train=False)
  meta_extra = {}
  init_from = upstream.resolve_init_from(config)  # "upstream:auto" -> dir
  if init_from:
    try:
      variables, meta_extra["init_from"] = pretrained.load_pretrained(
          variables, init_from, config.model.arch)
    except (ValueError, OSError) as e:
      # One line, but keep the whole list of mismatches.
      detail = "; ".join(l.strip() for l in str(e).splitlines() if l.strip())
      raise UserError(f"model.init_from={init_from!r}: "
                      f"{detail}") from None
  tx = optim.make_transform(config.optim)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32),
                           params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           opt_state=tx.init(variables["params"]))
  old_variables = jax.tree.map(jnp.copy, steps.variables_of(state))
  memory = replay.create(config, method, source)
  validate.check_disk_space(workdir, (
      validate.tree_bytes((state, old_variables, _memory_tree(memory)))
      * (config.train.keep_checkpoints + 1)))

  fingerprint = _fingerprint(config, source, memory.capacity)
  if is_chief:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 config.train.keep_checkpoints)
  results_tasks, start_task, start_step = [], 0, 0
  resumed_sums, resumed_seconds = {}, 0.0
  if config.resume and ckpt.steps():
    restored, meta = ckpt.restore_latest(
        {"train": state, "old": old_variables, "memory": _memory_tree(memory)},
        check_meta=lambda m: _check_fingerprint(m.get("fingerprint", {}),
                                                fingerprint, workdir))
    if restored is not None:
      state, old_variables = restored["train"], restored["old"]
      if memory.capacity:  # a method without replay checkpoints none
        memory = memory_lib.from_state(restored["memory"])
      results_tasks = meta["results"]
      start_task, start_step = meta["task"], meta["task_step"]
      resumed_sums = meta.get("label_sums", {})
      resumed_seconds = meta.get("task_seconds", 0.0)
      if is_chief:
        _trim_metrics(workdir, meta["global_step"])
      log.info("resumed from checkpoint at task %d step %d", start_task + 1,
               start_step)
  elif not config.resume and ckpt.steps():
    # resume=False never reads, overwrites or deletes a run's checkpoints.
    raise UserError(f"--config.resume=False but workdir {workdir} already "
                    "holds checkpoints of a run; pass a new --workdir to "
                    f"start fresh (or delete {ckpt.directory})")

  replicated = parallel.replicated(mesh)
  state = parallel.replicate(mesh, state)
  old_variables = parallel.replicate(mesh, old_variables)
  trace_counts = {"first": 0, "later": 0}

  def compiled(has_old):
    name = "later" if has_old else "first"
    fn = steps.make_train_step(
        model=model, method=method, config=config, tx=tx, has_old=has_old,
        on_trace=lambda: trace_counts.__setitem__(name,
                                                  trace_counts[name] + 1))

    def step_and_watch(state, old, batch, context, key, bad_step):
      # bad_step: the first global step (0-based) with a non-finite loss.
      new_state, out = fn(state, old, batch, context, key)
      bad = ~jnp.isfinite(out["loss"]) & (bad_step < 0)
      return new_state, out, jnp.where(bad, state.step, bad_step)

    return jax.jit(step_and_watch, donate_argnums=0,
                   out_shardings=(replicated, replicated, replicated))

  train_steps = {False: compiled(False), True: compiled(True)}
  predictor = Predictor(model, config, mesh)
  writer = reporting.Writer(workdir)

  def save(task_index, task_step, label_sums=None, task_seconds=0.0):
    meta = {"task": task_index, "task_step": task_step,
            "results": results_tasks, "fingerprint": fingerprint,
            "global_step": int(state.step), "label_sums": label_sums or {},
            "task_seconds": task_seconds, **meta_extra}
    ckpt.save({"train": state, "old": old_variables,
               "memory": _memory_tree(memory)}, meta)

  for task in tasks[start_task:]:
    t = task.index
    first = t == 0
    view = protocol.partial_view(source.train.labels, task.classes)
    if len(view) == 0:
      raise UserError(f"task {t + 1} has no training images (classes "
                      f"{[source.class_names[c] for c in task.classes]})")
    batches = loader.TaskBatches(
        split=source.train, view=view, memory=replay.visible_rows(memory, source),
        global_batch=config.train.global_batch,
        local_rows=parallel.local_batch_slice(config.train.global_batch),
        seed=config.seed, task=t, mix=config.memory.mix,
        fraction=config.memory.fraction)
    epochs = config.train.epochs_first if first else config.train.epochs_later
    total = epochs * batches.steps_per_epoch
    task_step0 = start_step if t == start_task else 0
    if task_step0 == 0:  # optimizer and schedule rebuilt for every task
      state = state.replace(opt_state=parallel.replicate(
          mesh, tx.init(state.params)))
    task_start = int(state.step) - task_step0
    context = parallel.replicate(mesh, steps.task_context(
        task, task_start=task_start, total_steps=total,
        lr_peak=config.optim.lr_first if first else config.optim.lr_later))
    step_fn = train_steps[not first]
    resumed = t == start_task and task_step0 > 0
    # Per-task sums of the label diagnostics, checkpointed with mid-task saves.
    label_sums = resumed_sums if resumed else {}
    seconds_before = resumed_seconds if resumed else 0.0
    bad_step = parallel.replicate(mesh, np.asarray(-1, np.int32))

    def check_finite():
      bad = int(bad_step)
      if bad >= 0:
        bar.close()
        raise NonFiniteLossError(
            f"non-finite loss at task {t + 1}, step {bad - task_start + 1} "
            f"of {total} (global step {bad}, counted from 0); the last good "
            f"checkpoint in {workdir} is kept")

    bar = tqdm.tqdm(total=total, initial=task_step0,
                    desc=f"task {t + 1}/{len(tasks)}", unit="step",
                    disable=not (config.train.progress and is_chief),
                    dynamic_ncols=True)
    started = time.time()
    for step, host_batch in batches.iterate(task_step0, total):
      batch = parallel.to_global(mesh, host_batch)
      state, out, bad_step = step_fn(state, old_variables, batch, context,
                                     root, bad_step)
      bar.update(1)
      if task_start + step == config.debug.kill_at_step:
        os.kill(os.getpid(), signal.SIGKILL)  # fault injection for tests
      last = step + 1 == total
      if (step + 1) % config.train.log_every == 0 or last:
        check_finite()
        out = _host(out)
        cls_sums = label_sums.setdefault("cls", {"pos": 0.0, "neg": 0.0})
        cls_sums["pos"] += float(out["cls_positives"])
        cls_sums["neg"] += float(out["cls_negatives"])
        for group, counts in out["labels"].items():
          sums = label_sums.setdefault(group, dict.fromkeys(counts, 0.0))
          for k, v in counts.items():
            sums[k] += float(v)
        scalars = {k: v for k, v in out.items() if k != "labels"}
        writer.write(int(state.step), scalars, task=t + 1,
                     task_step=step + 1)
        bar.set_postfix(loss=f"{float(out['loss']):.4f}")
      every = config.train.checkpoint_every
      if every and (step + 1) % every == 0 and not last:
        check_finite()
        save(t, step + 1, label_sums,
             seconds_before + time.time() - started)
    bar.close()
    train_seconds = seconds_before + time.time() - started

    variables = steps.variables_of(state)
    evaluation = _evaluate(predictor, variables, source, task, tasks,
                           config.eval.threshold)
    memory, buffer_quality = replay.after_task(
        mem=memory, config=config, method=method, source=source,
        view=view, task=task, tasks=tasks, predictor=predictor,
        variables=variables, old_variables=old_variables)
    old_variables = jax.tree.map(jnp.copy, variables)  # owns its buffers
    results_tasks.append({
        "task": t + 1, "classes": [source.class_names[c]
                                   for c in task.classes],
        "map_seen": evaluation["map_seen"],
        "map_per_task": evaluation["map_per_task"],
        "train_steps": total, "train_seconds": train_seconds,
        "num_train_images": len(view),
        "memory_rows": int(memory_lib.valid_rows(memory).size),
        "fpr_at_threshold": evaluation["fpr"],
        "labels_online": {g: _rates(s) for g, s in label_sums.items()
                          if g != "cls"},
        "labels_buffer": buffer_quality,
        "cls_label_pos_neg_ratio": (
            label_sums["cls"]["pos"] / max(label_sums["cls"]["neg"], 1.0)
            if "cls" in label_sums else 0.0),
        "f1": {k: evaluation[k] for k in
               ("cf1", "cf1_cp_cr", "of1", "cp", "cr", "op", "or")},
        "calibration": evaluation["calibration"],
    })
    save(t + 1, 0)
    log.info("task %d: mAP on seen classes %.2f", t + 1,
             evaluation["map_seen"])

  writer.close()
  ckpt.close()
  results = _summarise(config, source, tasks, results_tasks, mesh,
                       trace_counts)
  if is_chief:
    path = os.path.join(workdir, "results.json")
    with open(path + ".tmp", "w") as f:  # a kill never leaves half a file
      json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)
    reporting.save_plots(workdir, results)
  return results


def _summarise(config, source, tasks, results_tasks, mesh, trace_counts):
  matrix = [t["map_per_task"] for t in results_tasks]
  final_f1 = results_tasks[-1]["f1"]
  seen = [t["map_seen"] for t in results_tasks]
  return {
      "method": config.method, "dataset": source.name,
      "setting": ("joint" if len(tasks) == 1 and config.method == "joint"
                  else protocol.setting_name(config.protocol.base,
                                             config.protocol.increment)),
      "class_order": list(source.class_names),
      "tasks": results_tasks,
      "avg_map": float(np.mean(seen)), "last_map": float(seen[-1]),
      "cf1": final_f1["cf1"], "cf1_cp_cr": final_f1["cf1_cp_cr"],
      "of1": final_f1["of1"], "f1_threshold": config.eval.threshold,
      "forgetting": metrics.forgetting(matrix)["mean"],
      "forgetting_per_task": metrics.forgetting(matrix)["per_task"],
      "map_matrix": matrix,
      "versions": _versions(),
      "devices": {"count": mesh.size, "processes": jax.process_count(),
                  "kind": jax.devices()[0].device_kind,
                  "platform": jax.devices()[0].platform},
      "compilations": trace_counts,
      "config": json.loads(config.to_json_best_effort()),
  }
