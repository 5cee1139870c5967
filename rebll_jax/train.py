"""The task loop: ``run(config, workdir) -> results``.

A run is a short sequence of stages, the same as the README's "data through
a run":

  set_up            checks, devices, data source, protocol, model, steps
  restore_or_init   a fresh ``RunState`` or the newest sound checkpoint
  for each task:
    train_task      jitted data-parallel steps over new + replay batches
    finish_task     evaluate on the seen classes, update the replay memory
                    (select, store, relabel), save a checkpoint
  write_results     results.json and plots

``RunState`` *is* the checkpoint: its arrays (train state, past model,
replay buffer) and its position and results so far. Rerunning on the same
workdir resumes from the newest checkpoint (the end of a task, or a mid-task
save) and gives the same result as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from rebll_jax import checkpoint, diagnostics, dry_run, evaluation, methods
from rebll_jax import metrics
from rebll_jax import memory as memory_lib
from rebll_jax import models, optim, parallel, preemption, protocol, replay
from rebll_jax import reporting
from rebll_jax import run_identity, steps, validate, workdir_lock
from rebll_jax import host_malloc, xla_cpu
from rebll_jax.data import field_augment, loader
from rebll_jax.errors import UserError
from rebll_jax.models import pretrained

log = logging.getLogger("rebll_jax")
# Keys: the train step folds the global step into the root key; the head
# rows of task t (model.head_rows=fresh) come from this stream, folded with t.
HEAD_ROWS_STREAM = 2**31 - 2


class NonFiniteLossError(RuntimeError):
  """The loss, the gradient or the updated state became NaN or inf; the last
  good checkpoint is kept.

  Every step checks, on the device, its loss, its gradient norm and every
  updated parameter and batch statistic (a running "first bad step" record,
  no host sync); the host reads it at log steps and before every save, so a
  non-finite state is never checkpointed.
  """


# What went non-finite first (codes of the watch record).
NON_FINITE_WHAT = {1: "loss", 2: "gradient", 3: "parameters or batch "
                   "statistics"}


# ------------------------------------------------------------------ setup --

@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything about a run that does not change while it trains."""

  config: Any
  workdir: str
  method: methods.Method
  source: Any  # data.Source
  tasks: list
  mesh: Any
  model: Any
  tx: optax.GradientTransformation
  predictor: evaluation.Predictor
  root_key: jax.Array
  is_chief: bool
  init_from: str  # model.init_from resolved ("upstream:auto" -> a folder)
  lock: workdir_lock.WorkdirLock | None  # held by process 0 while it runs


def set_up(config, workdir: str, setting=None) -> Setup:
  """Every check that needs no compile, then the run's fixed pieces.
  ``setting``: see ``validate.check_config``."""
  validate.check_config(config, setting)
  validate.check_workdir(workdir)
  if config.distributed:
    parallel.initialize_distributed(config.dist)
  lock = None
  if jax.process_index() == 0:  # before anything in the workdir changes
    lock = workdir_lock.WorkdirLock(workdir).acquire()
  try:
    return _set_up_locked(config, workdir, lock, setting)
  except BaseException:
    if lock is not None:
      lock.release()
    raise


def _set_up_locked(config, workdir, lock, setting) -> Setup:
  method = methods.get_method(config.method)
  source = validate.build_source(config.data)
  mesh = parallel.make_mesh(config.num_devices)
  validate.check_all(config, num_classes=source.num_classes,
                     num_devices=mesh.size, num_processes=jax.process_count(),
                     setting=setting)
  tasks = method.tasks(source.num_classes, config.protocol)
  validate.check_tasks(source, tasks, config.protocol)
  init_from = validate.check_init_from(config)  # "upstream:auto" -> dir
  model = models.build_model(config.model, source.num_classes,
                             norm_groups=config.train.get("ddp_processes", 1))
  # Process-wide, before the first step allocates (rebll_jax/host_malloc.py).
  host_malloc.apply(config.get("host_malloc", "retain"), log)
  return Setup(config=config, workdir=workdir, method=method, source=source,
               tasks=tasks, mesh=mesh, model=model,
               tx=optim.make_transform(config.optim),
               predictor=evaluation.Predictor(model, config, mesh),
               root_key=jax.random.key(config.seed),
               is_chief=jax.process_index() == 0, lock=lock,
               init_from=init_from)


def _versions() -> dict:
  import flax, orbax.checkpoint  # pylint: disable=g-import-not-at-top,multiple-imports
  from rebll_jax import __version__  # pylint: disable=g-import-not-at-top
  return {"rebll_jax": __version__, "jax": jax.__version__,
          "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__")
          else jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "numpy": np.__version__,
          "orbax": orbax.checkpoint.__version__}


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


# -------------------------------------------------------------- run state --

@dataclasses.dataclass
class RunState:
  """The whole state of a run between two steps: the checkpoint tree.

  ``task`` / ``task_step``: the task in progress (index) and the steps of it
  already taken (0 at a task boundary). ``results``: one row per finished
  task. ``label_sums`` / ``task_seconds``: the task-in-progress's label
  diagnostics and training time so far (so a mid-task resume reports the
  same numbers). ``task_schedule``: the epochs and peak learning rate the
  task in progress was started with (a mid-task resume must keep them).
  """

  train: steps.TrainState
  old: Any  # past model variables (the frozen model of the previous task)
  memory: memory_lib.Memory
  task: int = 0
  task_step: int = 0
  results: list = dataclasses.field(default_factory=list)
  label_sums: dict = dataclasses.field(default_factory=dict)
  task_seconds: float = 0.0
  task_schedule: dict = dataclasses.field(default_factory=dict)
  # What loaded the backbone at init (pretrained.load_pretrained's record;
  # {} = random init): the run's, whatever a resuming process's
  # model.init_from says (it is not read on resume).
  init_from: dict = dataclasses.field(default_factory=dict)
  # The fields the fingerprint leaves out (run_identity.may_change_values),
  # as the process that trained last had them: results.json's config.
  trained_with: dict = dataclasses.field(default_factory=dict)
  # results.json's ``compilations``, ``devices`` and ``versions`` as the
  # process that trained last had them at its last save: a rerun that
  # trains nothing writes these, not its own zeros and machine.
  process_record: dict = dataclasses.field(default_factory=dict)

  def arrays(self) -> dict:
    # Orbax cannot save zero-size arrays: no buffer, no entry.
    memory = (memory_lib.to_state(self.memory) if self.memory.capacity
              else {})
    return {"train": self.train, "old": self.old, "memory": memory}

  def meta(self) -> dict:
    return {"task": self.task, "task_step": self.task_step,
            "results": self.results, "global_step": int(self.train.step),
            "label_sums": self.label_sums, "task_seconds": self.task_seconds,
            "task_schedule": self.task_schedule,
            "trained_with": self.trained_with,
            "process_record": self.process_record,
            **({"init_from": self.init_from} if self.init_from else {})}

  def restored(self, arrays: dict, meta: dict) -> "RunState":
    """This state's shapes filled from a checkpoint's arrays and meta."""
    memory = (memory_lib.from_state(arrays["memory"])
              if self.memory.capacity else self.memory)
    return RunState(train=arrays["train"], old=arrays["old"], memory=memory,
                    task=meta["task"], task_step=meta["task_step"],
                    results=meta["results"],
                    label_sums=meta.get("label_sums", {}),
                    task_seconds=meta.get("task_seconds", 0.0),
                    task_schedule=meta.get("task_schedule", {}),
                    init_from=meta.get("init_from", {}),
                    trained_with=meta.get("trained_with", {}),
                    process_record=meta.get("process_record", {}))


def _initial_state(setup: Setup) -> RunState:
  config, size = setup.config, setup.config.data.image_size
  variables = models.init_variables(
      setup.model, jax.random.fold_in(setup.root_key, 0), size)
  init_record = {}
  if setup.init_from:
    try:
      variables, init_record = pretrained.load_pretrained(
          variables, setup.init_from, config.model.arch)
    except (ValueError, OSError) as e:
      # One line, but keep the whole list of mismatches.
      detail = "; ".join(l.strip() for l in str(e).splitlines()
                         if l.strip()).replace(":; ", ": ")
      raise UserError(f"model.init_from={setup.init_from!r}: "
                      f"{detail}") from None
  train_state = steps.initial_train_state(setup.tx, variables)
  return RunState(train=train_state,
                  old=steps.copy_tree(steps.variables_of(train_state)),
                  memory=replay.create(config, setup.method, setup.source),
                  init_from=init_record)


def _open_checkpoints(setup: Setup) -> checkpoint.Checkpointer:
  return checkpoint.Checkpointer(
      os.path.join(setup.workdir, "checkpoints"),
      setup.config.train.keep_checkpoints)


def task_schedule(config, task_index: int) -> dict:
  """The epochs and peak learning rate of task ``task_index`` (0-based)."""
  first = task_index == 0
  return {"epochs": config.train.epochs_first if first
                    else config.train.epochs_later,
          "lr_peak": config.optim.lr_first if first else config.optim.lr_later}


def _check_task_schedule(config, state: RunState, workdir: str):
  """Refuses a mid-task resume that would change the task's schedule.

  ``train.epochs_later`` and ``optim.lr_later`` may change on resume (to
  extend a run), but a task half-trained on one one-cycle schedule cannot
  finish on another: with fewer epochs the task would stop at once and
  report a step count it never trained, with another rate the two halves
  mix. (Checkpoints written before the schedule was recorded: unchecked.)
  """
  saved = state.task_schedule
  if not state.task_step or not saved:
    return
  wanted = task_schedule(config, state.task)
  fields = {"epochs": "train.epochs_later", "lr_peak": "optim.lr_later"}
  differ = [k for k in fields if saved.get(k) != wanted[k]]
  if not differ:
    return
  t = state.task + 1
  was = ", ".join(f"{fields[k]}={saved[k]}" for k in differ)
  now = ", ".join(f"{fields[k]}={wanted[k]}" for k in differ)
  keep = " ".join(f"--config.{fields[k]}={saved[k]}" for k in differ)
  raise UserError(
      f"the checkpoint in {workdir} is in the middle of task {t} (step "
      f"{state.task_step}), started with {was}; this run asks for {now}, and "
      "a task cannot change its schedule halfway. Resume with the old "
      f"values ({keep}); to use the new ones from task {t + 1} on, finish "
      f"task {t} with them first (--config.protocol.num_tasks={t}), then "
      "continue with the new values")


def restore_or_init(setup: Setup, ckpt: checkpoint.Checkpointer
                    ) -> tuple[RunState, dict]:
  """The newest sound checkpoint of this run, or a fresh state.

  Returns the state (replicated on the mesh) and the run's fingerprint.
  """
  config, workdir = setup.config, setup.workdir
  state = _initial_state(setup)
  validate.check_disk_space(workdir, (
      validate.tree_bytes(state.arrays())
      * (config.train.keep_checkpoints + 1)))
  fingerprint = run_identity.fingerprint(config, setup.source,
                                         state.memory.capacity)
  resumed_step = 0  # metrics.jsonl keeps the lines up to here
  if config.resume and ckpt.steps():
    arrays, meta = ckpt.restore_latest(
        state.arrays(),
        check_meta=lambda m: run_identity.check(m.get("fingerprint", {}),
                                                fingerprint, workdir))
    if arrays is not None:
      state = state.restored(arrays, meta)
      resumed_step = meta["global_step"]
      if state.task > len(setup.tasks):
        # Its results.json would hold more tasks than its config names.
        raise UserError(
            f"the run in {workdir} has finished {state.task} tasks; "
            f"protocol.num_tasks={config.protocol.num_tasks} asks for "
            f"{len(setup.tasks)}. Rerun it with protocol.num_tasks >= "
            f"{state.task} (or -1) to write its results again, or use a new "
            "--workdir for a shorter run")
      if state.task >= len(setup.tasks) and state.task_step > 0:
        # A task beyond the config was started (an extension stopped
        # midway): "complete" would write that process's values, not those
        # the finished tasks trained with, beside its task's metric lines.
        raise UserError(
            f"the run in {workdir} stopped in the middle of task "
            f"{state.task + 1} (step {state.task_step}); "
            f"protocol.num_tasks={config.protocol.num_tasks} asks for "
            f"{len(setup.tasks)}. Rerun it with protocol.num_tasks >= "
            f"{state.task + 1} (or -1) to finish that task, or use a new "
            "--workdir")
      _warn_init_from_not_read(setup, state)
      if state.task >= len(setup.tasks):
        log.info("the run in %s is complete (%d tasks); writing its results "
                 "again", workdir, state.task)
        _warn_values_not_applied(config, state)
      else:
        _check_task_schedule(config, state, workdir)
        log.info("resumed from checkpoint at task %d step %d", state.task + 1,
                 state.task_step)
  elif not config.resume and ckpt.steps():
    # resume=False never reads, overwrites or deletes a run's checkpoints.
    raise UserError(f"--config.resume=False but workdir {workdir} already "
                    "holds checkpoints of a run; pass a new --workdir to "
                    f"start fresh (or delete {ckpt.directory})")
  if state.task < len(setup.tasks) or not state.trained_with:
    # This process trains what is left (or a checkpoint from before the
    # record): its values are the run's from here on, but for the fields
    # read at init only, which stay the first process's.
    state.trained_with = {
        **run_identity.may_change_values(config),
        **{k: state.trained_with[k] for k in _INIT_ONLY
           if k in state.trained_with}}
  # Only now, with the run's identity checked, does the workdir change.
  if setup.is_chief:
    _trim_metrics(workdir, resumed_step)  # a killed run's tail
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(run_config(config, state), f, indent=2)
    # What the run follows, its extension's tasks included (a dry run's
    # file of fewer tasks would go stale beside the results).
    dry_run.write_protocol(workdir, dry_run.plan(
        config, setup.source, setup.method, setup.tasks))
  state.train = parallel.replicate(setup.mesh, state.train)
  state.old = parallel.replicate(setup.mesh, state.old)
  return state, fingerprint


def run_config(config, state: RunState) -> dict:
  """The config the run trained with (config.json, results.json): this
  process's, with the fields a resume may change as the process that trained
  last had them. A rerun of a finished run trains nothing and changes
  neither file's values."""
  return run_identity.with_values(json.loads(config.to_json_best_effort()),
                                  state.trained_with)


# Fields read when the run starts from scratch and never on resume.
_INIT_ONLY = ("model.init_from",)

# Fields a rerun of a finished run would silently not apply: they change
# what the tasks train (init_from is warned about on every resume).
_TRAINING_FIELDS = ("train.epochs_later", "optim.lr_later")


def _warn_values_not_applied(config, state: RunState):
  wanted = run_identity.may_change_values(config)
  for field in _TRAINING_FIELDS:
    if field in state.trained_with and \
        state.trained_with[field] != wanted.get(field):
      log.warning(
          "%s=%r is not applied: the run is complete and trained its last "
          "task with %r (results.json keeps that); raise protocol.num_tasks "
          "to train more tasks with the new value", field, wanted.get(field),
          state.trained_with[field])


def _warn_init_from_not_read(setup: Setup, state: RunState):
  """A resumed run keeps the backbone it was initialised with: say so when
  this process's model.init_from names another."""
  recorded = state.init_from.get("ckpt_dir") or state.init_from.get("source")
  asked = os.path.abspath(setup.init_from) if setup.init_from else None
  if asked == recorded or (asked is None and not state.init_from):
    return
  sha = state.init_from.get("source_sha256")
  was = (f"from {recorded}" + (f" (sha256 {sha[:16]}...)" if sha else "")
         if recorded else "at random (no model.init_from)")
  log.warning("model.init_from=%r is not read on resume: the run in %s was "
              "initialised %s", setup.config.model.init_from or "",
              setup.workdir, was)


def save(setup: Setup, ckpt: checkpoint.Checkpointer, state: RunState,
         fingerprint: dict):
  ckpt.save(state.arrays(), {**state.meta(), "fingerprint": fingerprint})


# ------------------------------------------------------------- train step --

@dataclasses.dataclass
class CompiledSteps:
  """The jitted train steps (first task; later tasks) and their trace counts.

  Each step also carries ``watch``, int32 [2]: the first global step
  (0-based) where something went non-finite and what (``NON_FINITE_WHAT``),
  or (-1, 0); it is updated on the device, so watching costs no host sync.
  """

  first: Callable
  later: Callable
  trace_counts: dict


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def compile_steps(setup: Setup) -> CompiledSteps:
  trace_counts = {"first": 0, "later": 0}
  replicated = parallel.replicated(setup.mesh)

  def jitted(has_old):
    name = "later" if has_old else "first"
    fn = steps.make_train_step(
        model=setup.model, method=setup.method, config=setup.config,
        tx=setup.tx, has_old=has_old,
        on_trace=lambda: trace_counts.__setitem__(name,
                                                  trace_counts[name] + 1))

    def step_and_watch(state, old, batch, context, key, truth, watch):
      new_state, out = fn(state, old, batch, context, key, truth)
      what = jnp.where(
          ~jnp.isfinite(out["loss"]), 1,
          jnp.where(~jnp.isfinite(out["grad_norm"]), 2,
                    jnp.where(_all_finite((new_state.params,
                                           new_state.batch_stats)), 0, 3)))
      first = (what > 0) & (watch[0] < 0)
      return new_state, out, jnp.where(
          first, jnp.stack([state.step, what]).astype(jnp.int32), watch)

    return jax.jit(step_and_watch, donate_argnums=0,
                   out_shardings=(replicated, replicated, replicated),
                   compiler_options=xla_cpu.options_for(setup.config.model))

  return CompiledSteps(first=jitted(False), later=jitted(True),
                       trace_counts=trace_counts)


def _task_batches(setup: Setup, state: RunState, task, view):
  config = setup.config
  batches = loader.TaskBatches(
      split=setup.source.train, view=view,
      memory=replay.visible_rows(state.memory, setup.source),
      global_batch=config.train.global_batch,
      local_rows=parallel.local_batch_slice(config.train.global_batch),
      seed=config.seed, task=task.index, mix=config.memory.mix,
      fraction=config.memory.fraction,
      host_augment=field_augment.from_config(
          config.augment, workers=config.data.num_workers),
      last_batch=config.train.get("last_batch", "drop"),
      processes=config.train.get("ddp_processes", 1))
  note = batches.wrap_note()
  if note:
    log.warning(note)
  return batches


def _task_view(setup: Setup, task):
  view = protocol.train_view(setup.source, task.classes,
                             setup.config.protocol)
  if len(view) == 0:
    names = [setup.source.class_names[c] for c in task.classes]
    raise UserError(f"task {task.index + 1} has no training images (classes "
                    f"{names})")
  return view


def train_task(setup: Setup, state: RunState, task, view, compiled,
               writer: reporting.Writer, save_fn,
               stop: preemption.StopOnSigterm | None = None) -> RunState:
  """Trains ``task`` from ``state.task_step`` to its last step.

  ``stop``: on SIGTERM, saves after the current step and raises
  ``preemption.Preempted``."""
  config, mesh, t = setup.config, setup.mesh, task.index
  first = t == 0
  state.memory = replay.before_task(state.memory, config=config,
                                    source=setup.source, task=task,
                                    tasks=setup.tasks)
  batches = _task_batches(setup, state, task, view)
  state.task_schedule = task_schedule(config, t)
  total = state.task_schedule["epochs"] * batches.steps_per_epoch
  if state.task_step == 0:  # optimizer and schedule rebuilt for every task
    if config.model.head_rows == "fresh":
      state.train = state.train.replace(params=parallel.replicate(
          mesh, steps.fresh_head_rows(
              state.train.params, jnp.asarray(task.classes),
              jax.random.fold_in(jax.random.fold_in(
                  setup.root_key, HEAD_ROWS_STREAM), t),
              head_name=setup.model.head_name,
              kernel_std=models.FIRST_HEAD_KERNEL_STD.get(
                  config.model.arch) if first else None)))
    state.train = state.train.replace(opt_state=parallel.replicate(
        mesh, steps.fresh_opt_state(setup.tx, state.train.params)))
  task_start = int(state.train.step) - state.task_step
  context = parallel.replicate(mesh, steps.task_context(
      task, task_start=task_start, total_steps=total,
      lr_peak=state.task_schedule["lr_peak"]))
  step_fn = compiled.later if not first else compiled.first
  sums = diagnostics.LabelSums(state.label_sums)
  state.label_sums = sums.sums
  seconds_before = state.task_seconds
  watch = parallel.replicate(mesh, np.asarray([-1, 0], np.int32))
  bar = tqdm.tqdm(total=total, initial=state.task_step,
                  desc=f"task {t + 1}/{len(setup.tasks)}", unit="step",
                  disable=not (config.train.progress and setup.is_chief),
                  dynamic_ncols=True)

  def check_finite():
    bad, what = (int(v) for v in np.asarray(watch))
    if bad >= 0:
      bar.close()
      raise NonFiniteLossError(
          f"non-finite {NON_FINITE_WHAT[what]} at task {t + 1}, step "
          f"{bad - task_start + 1} of {total} (global step {bad}, counted "
          f"from 0); the last good checkpoint in {setup.workdir} is kept")

  started = time.time()
  for step, host_batch in batches.iterate(state.task_step, total):
    truth = host_batch.pop("true_labels")  # never inside the training batch
    truth = (parallel.to_global(mesh, truth)
             if config.train.label_diagnostics else None)
    state.train, out, watch = step_fn(
        state.train, state.old, parallel.to_global(mesh, host_batch), context,
        setup.root_key, truth, watch)
    bar.update(1)
    if task_start + step == config.debug.kill_at_step:
      os.kill(os.getpid(), signal.SIGKILL)  # fault injection for tests
    if task_start + step == config.debug.term_at_step:
      os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's notice, for tests
    last = step + 1 == total
    if (step + 1) % config.train.log_every == 0 or last:
      check_finite()
      out = evaluation.to_host(out)
      sums.add(out)
      scalars = {k: v for k, v in out.items() if k != "labels"}
      writer.write(int(state.train.step), scalars, task=t + 1,
                   task_step=step + 1)
      bar.set_postfix(loss=f"{float(out['loss']):.4f}")
    every = config.train.checkpoint_every
    stopping = stop is not None and stop.due(task_start + step + 1)
    if stopping or (every and (step + 1) % every == 0 and not last):
      check_finite()
      state.task_step = step + 1
      state.task_seconds = seconds_before + time.time() - started
      save_fn(state)
    if stopping:
      bar.close()
      raise preemption.Preempted(
          f"stopped by SIGTERM at task {t + 1}, step {step + 1} of {total}; "
          f"checkpoint saved in {setup.workdir}: the same command resumes")
  bar.close()
  state.task_step = total
  state.task_seconds = seconds_before + time.time() - started
  return state


# ------------------------------------------------------------- after task --

def _skipped_steps(opt_state) -> dict:
  """{"skipped_steps": n} of the task under ``optim.loss_scale=torch_fp16``
  (the steps the baseline's GradScaler would have skipped), else {}."""
  metrics = optim.loss_scale_metrics(opt_state)
  if not metrics:
    return {}
  return {"skipped_steps": int(np.asarray(
      metrics["skipped_steps"].addressable_data(0)))}


def finish_task(setup: Setup, state: RunState, task, view) -> RunState:
  """Evaluates, updates the replay memory, records the task's results row
  and moves ``state`` to the next task's boundary."""
  config, source = setup.config, setup.source
  variables = steps.variables_of(state.train)
  scores = evaluation.evaluate(setup.predictor, variables, source, task,
                               setup.tasks, config.eval.threshold,
                               protocol_cfg=config.protocol)
  state.memory, buffer_quality = replay.after_task(
      state.memory, config=config, method=setup.method, source=source,
      view=view, task=task, tasks=setup.tasks, predictor=setup.predictor,
      variables=variables, old_variables=state.old)
  state.old = steps.copy_tree(variables)  # owns its buffers
  sums = diagnostics.LabelSums(state.label_sums)
  state.results.append({
      "task": task.index + 1,
      "classes": [source.class_names[c] for c in task.classes],
      "map_seen": scores["map_seen"],
      "map_per_task": scores["map_per_task"],
      "train_steps": state.task_step, "train_seconds": state.task_seconds,
      # What this task trained with (a resume may change later tasks').
      "epochs": state.task_schedule.get("epochs"),
      "lr_peak": state.task_schedule.get("lr_peak"),
      "num_train_images": len(view),
      "memory_rows": int(memory_lib.valid_rows(state.memory).size),
      "fpr_at_threshold": scores["fpr"],
      "labels_online": sums.online(),
      "labels_buffer": buffer_quality,
      "cls_label_pos_neg_ratio": sums.cls_pos_neg_ratio(),
      "f1": {k: scores[k] for k in
             ("cf1", "cf1_cp_cr", "of1", "cp", "cr", "op", "or")},
      "calibration": scores["calibration"],
      **_skipped_steps(state.train.opt_state),
  })
  state.task, state.task_step = task.index + 1, 0
  state.label_sums, state.task_seconds = {}, 0.0
  log.info("task %d: mAP on seen classes %.2f", task.index + 1,
           scores["map_seen"])
  return state


# -------------------------------------------------------------------- run --

def run(config, workdir: str, setting=None) -> dict:
  """Trains every task of ``config`` in ``workdir``; returns results.
  ``setting``: the config file's config before overrides (main passes it;
  see ``validate.check_config``)."""
  if config.get("dry_run", False):  # the protocol only: no model, no compile
    return dry_run.run(config, workdir, setting)
  setup = set_up(config, workdir, setting)
  try:
    ckpt = _open_checkpoints(setup)
    try:
      state, fingerprint = restore_or_init(setup, ckpt)
      compiled = compile_steps(setup)
      # The global step it starts from: TensorBoard hides a killed run's
      # events past it, as metrics.jsonl dropped its lines.
      writer = reporting.Writer(workdir, resumed_step=int(
          state.train.step.addressable_data(0)))

      def save_fn(s: RunState):
        s.process_record = process_record(setup, compiled.trace_counts)
        save(setup, ckpt, s, fingerprint)

      with preemption.StopOnSigterm() as stop:
        try:
          for task in setup.tasks[state.task:]:
            view = _task_view(setup, task)
            state = train_task(setup, state, task, view, compiled, writer,
                               save_fn, stop)
            state = finish_task(setup, state, task, view)
            save_fn(state)
            if stop.requested and state.task < len(setup.tasks):
              raise preemption.Preempted(
                  f"stopped by SIGTERM after task {state.task}; checkpoint "
                  f"saved in {workdir}: the same command resumes")
        finally:
          writer.close()
    finally:
      ckpt.close()
    results = summarise(setup, state, compiled.trace_counts)
    if not any(compiled.trace_counts.values()):
      # A rerun of a finished run trained nothing: the record of the process
      # that trained stays (its compile counts, devices, versions), from the
      # checkpoint, or from results.json for a checkpoint older than that.
      results.update(state.process_record
                     or _previous_process_record(workdir))
    if setup.is_chief:
      write_results(workdir, results)
    return results
  finally:
    if setup.lock is not None:
      setup.lock.release()


# What results.json says of the process that trained (not of the run).
_PROCESS_RECORD = ("compilations", "devices", "versions")


def _previous_process_record(workdir: str) -> dict:
  """``compilations``, ``devices`` and ``versions`` of the results.json
  already in ``workdir`` (those it has): the process that trained, which a
  rerun that trains nothing keeps rather than its own zeros and machine."""
  try:
    with open(os.path.join(workdir, "results.json")) as f:
      previous = json.load(f)
  except (OSError, ValueError):
    return {}
  if not isinstance(previous, dict):
    return {}
  return {k: previous[k] for k in _PROCESS_RECORD
          if isinstance(previous.get(k), dict)}


def process_record(setup: Setup, trace_counts: dict) -> dict:
  """What results.json says of this process (``_PROCESS_RECORD``)."""
  return {"versions": _versions(),
          "devices": {"count": setup.mesh.size,
                      "processes": jax.process_count(),
                      "kind": jax.devices()[0].device_kind,
                      "platform": jax.devices()[0].platform},
          "compilations": dict(trace_counts)}


def write_results(workdir: str, results: dict):
  path = os.path.join(workdir, "results.json")
  with open(path + ".tmp", "w") as f:  # a kill never leaves half a file
    json.dump(results, f, indent=2)
  os.replace(path + ".tmp", path)
  reporting.save_plots(workdir, results)


def summarise(setup: Setup, state: RunState, trace_counts: dict) -> dict:
  config, results_tasks = setup.config, state.results
  matrix = [t["map_per_task"] for t in results_tasks]
  final_f1 = results_tasks[-1]["f1"]
  seen = [t["map_seen"] for t in results_tasks]
  return {
      "method": config.method, "dataset": setup.source.name,
      "setting": ("joint" if setup.method.joint
                  else protocol.setting_name(config.protocol.base,
                                             config.protocol.increment)),
      "class_order": list(setup.source.class_names),
      "tasks": results_tasks,
      "avg_map": float(np.mean(seen)), "last_map": float(seen[-1]),
      "cf1": final_f1["cf1"], "cf1_cp_cr": final_f1["cf1_cp_cr"],
      "of1": final_f1["of1"], "f1_threshold": config.eval.threshold,
      "forgetting": metrics.forgetting(matrix)["mean"],
      "forgetting_per_task": metrics.forgetting(matrix)["per_task"],
      "map_matrix": matrix,
      **process_record(setup, trace_counts),
      "initialised_from": state.init_from or None,
      "config": run_config(config, state),
  }
