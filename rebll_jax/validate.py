"""Checks of a config against the machine, before anything is compiled.

Each failure is a ``UserError`` whose one-line message names the problem and
the fix. The CLI prints it and exits with code 2.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import numpy as np

from rebll_jax import config_base, config_checks, config_reads, data, losses
from rebll_jax import methods, models
from rebll_jax import host_malloc, optim, parallel, protocol, xla_cpu
from rebll_jax.models import conv, norm
from rebll_jax.errors import UserError


log = logging.getLogger("rebll_jax")


def _check(condition: bool, message: str):
  if not condition:
    raise UserError(message)


def _registries() -> dict:
  """Config field -> the registry (dict or tuple of names) it picks from.

  Each registry lives with its components and owns its list of names."""
  from rebll_jax import memory, replay, steps  # pylint: disable=g-import-not-at-top
  from rebll_jax.data import augment, loader  # pylint: disable=g-import-not-at-top
  return {"method": methods.METHODS, "data.source": data.SOURCES,
          "model.arch": models.ARCHS, "model.conv_impl": conv.IMPLS,
          "model.norm_impl": norm.IMPLS,
          "model.cpu_library_fusion": xla_cpu.CPU_LIBRARY_FUSIONS,
          "model.cpu_scheduler": xla_cpu.CPU_SCHEDULERS,
          "host_malloc": host_malloc.HOST_MALLOCS,
          "model.dtype": models.DTYPES, "optim.name": optim.OPTIMIZERS,
          "optim.schedule": optim.SCHEDULES,
          "optim.loss_scale": optim.LOSS_SCALES,
          "memory.selection": memory.SELECTIONS, "memory.mix": loader.MIXES,
          "augment.policy": augment.POLICIES,
          "augment.cutout_fill": augment.CUTOUT_FILLS,
          "loss.reduction": ("",) + methods.CLS_REDUCTIONS,
          "loss.decay_on": losses.DECAY_ON,
          "protocol.memory_future_labels": replay.MEMORY_FUTURE_LABELS,
          "model.head_rows": steps.HEAD_ROWS,
          "train.last_batch": loader.LAST_BATCH}


def check_config(config, setting=None):
  """Checks that need no data and no devices.

  ``setting``: the config file's own config before command-line overrides
  (main passes it). A ``loss`` field the method does not read is refused
  only where it differs from the setting (a setting may choose a knob for
  the methods that read it; ``--config.loss.X`` on a method that ignores X
  is still an error). Default: the base config. ``relabel`` thresholds
  the method never applies are checked the same way, with a setting only,
  and so are knobs another choice leaves unread (``config_reads``: the
  small ResNet's width under a ResNet-50, SGD's momentum under Adam).
  """
  config_checks.check_values(config)  # every numeric field in range, first
  _check(config.model.dtype != "float16",
         "model.dtype=float16 is not offered: it needs loss scaling, which "
         "the train step does not do (small gradients underflow to 0 and the "
         "run goes on); use bfloat16, which has float32's range")
  for name, registry in _registries().items():
    value = config_reads.field_value(config, name)
    valid = sorted(registry) if isinstance(registry, dict) else list(registry)
    _check(value in registry,
           f"unknown {name} {value!r}; valid: {valid}")
  optim.check_choices(config.optim)
  method = methods.get_method(config.method)
  # relabel: only against the config file's own values (a file may set a
  # threshold for every method; without it the base config's defaults
  # would make that look like an override).
  ignored = method.ignored_config(config,
                                  setting or config_base.base_config(),
                                  loss_only=setting is None)
  reasons = "; ".join(dict.fromkeys(ignored.values()))
  _check(not ignored,
         f"method {config.method!r} does not read {', '.join(ignored)} "
         f"({reasons}); drop the override or pick a method that uses it")
  if setting is not None:
    unread = config_reads.unread_overrides(config, setting)
    reasons = "; ".join(f"{', '.join(k for k in unread if unread[k] == r)}: "
                        f"{r}" for r in dict.fromkeys(unread.values()))
    _check(not unread,
           f"nothing reads {', '.join(unread)} in this config ({reasons}); "
           "drop the override or change the choice it depends on")
    if method.joint:
      joint_ignored = config_reads.joint_ignored_overrides(config, setting)
      if joint_ignored:
        log.warning("method 'joint' trains one task over all classes: "
                    "%s not read", ", ".join(
                        f"{k}={config_reads.field_value(config, k)}"
                        for k in joint_ignored))
  _check(0.0 <= config.memory.fraction < 1.0,
         "memory.fraction must be in [0, 1)")
  _check(config.memory.per_class >= 0 and config.memory.total >= 0,
         "memory.per_class and memory.total must be >= 0")
  if method.replay:
    # memory.capacity_for raises (a traceback) once the first task ends.
    _check(config.memory.per_class > 0 or config.memory.total > 0,
           f"method {config.method!r} replays exemplars but "
           "memory.per_class=0 and memory.total=0 leave it no memory; set "
           "memory.per_class > 0 (exemplars per class) or memory.total > 0 "
           "(a fixed total), or pick a method without replay")
    if config.memory.mix == "fraction":
      check_memory_fraction(config.memory.fraction,
                            config.train.global_batch)
  _check(config.train.global_batch > 0, "train.global_batch must be > 0")
  check_ddp_processes(config.train)
  check_last_batch(config)
  _check(config.train.epochs_first > 0 and config.train.epochs_later > 0,
         "train.epochs_first and train.epochs_later must be > 0")
  _check(config.train.eval_batch > 0, "train.eval_batch must be > 0")
  _check(config.train.log_every > 0, "train.log_every must be > 0")
  _check(config.train.checkpoint_every >= 0,
         "train.checkpoint_every must be >= 0 (0 = only at task boundaries)")
  _check(config.data.image_size >= 8, "data.image_size must be >= 8")
  _check(config.optim.lr_first > 0 and config.optim.lr_later > 0,
         "optim.lr_first and optim.lr_later must be > 0")
  _check(0.0 <= config.optim.warmup_frac < 1.0,
         "optim.warmup_frac must be in [0, 1)")
  for name in ("tau_old", "tau_cur", "tau_pseudo"):
    value = config.relabel[name]
    _check(0.0 < value < 1.0, f"relabel.{name} must be in (0, 1)")
  for name in ("tau_old", "tau_cur"):
    low = config.relabel[f"{name}_low"]
    _check(low < 0 or 0.0 <= low <= config.relabel[name],
           f"relabel.{name}_low must be < 0 (same as relabel.{name}) or in "
           f"[0, relabel.{name}], got {low}")
  _check(config.relabel.chunk > 0, "relabel.chunk must be > 0")
  _check(config.seed >= 0, "seed must be >= 0")
  _check(config.num_devices >= 0,
         "num_devices must be >= 0 (0 = all local devices)")
  _check(config.protocol.num_tasks == -1 or config.protocol.num_tasks > 0,
         "protocol.num_tasks must be > 0, or -1 for every task")
  _check(config.train.keep_checkpoints >= 1,
         "train.keep_checkpoints must be >= 1")
  _check(config.data.num_workers >= 1, "data.num_workers must be >= 1")
  _check(0.0 <= config.data.val_fraction < 1.0,
         "data.val_fraction must be in [0, 1)")
  syn = config.data.synthetic
  _check(syn.num_train > 0 and syn.num_test > 0,
         "data.synthetic.num_train and num_test must be > 0")
  _check(syn.render_size >= 8, "data.synthetic.render_size must be >= 8")
  _check(config.model.width > 0, "model.width must be > 0")
  stages = tuple(config.model.stage_sizes)
  _check(len(stages) > 0 and all(isinstance(n, int) and n >= 1
                                 for n in stages),
         "model.stage_sizes must be a non-empty tuple of ints >= 1, e.g. "
         "(1, 1, 1)")
  _check(config.model.stem_stride in (1, 2), "model.stem_stride must be 1 or 2")
  o = config.optim
  _check(o.weight_decay >= 0, "optim.weight_decay must be >= 0")
  _check(0.0 <= o.momentum < 1.0, "optim.momentum must be in [0, 1)")
  _check(o.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 = off)")
  a = config.augment
  _check(0.0 <= a.cutout <= 1.0, "augment.cutout must be in [0, 1]")
  _check(a.randaugment_ops >= 0, "augment.randaugment_ops must be >= 0")
  _check(0.0 <= a.randaugment_magnitude <= 1.0,
         "augment.randaugment_magnitude must be in [0, 1]")
  l = config.loss
  for name in ("g_pos", "g_neg", "w_pos", "w_neg", "lambda_kd", "beta"):
    _check(l[name] >= 0, f"loss.{name} must be >= 0")
  _check(0.0 <= l.margin < 1.0, "loss.margin must be in [0, 1)")
  _check(l.temperature > 0, "loss.temperature must be > 0")
  _check(l.pod_flat_weight >= 0, "loss.pod_flat_weight must be >= 0")
  _check(0.0 <= config.relabel.warmup_frac <= 1.0,
         "relabel.warmup_frac must be in [0, 1]")
  _check(0.0 < config.eval.threshold < 1.0, "eval.threshold must be in (0, 1)")
  for name in ("lr_first", "lr_later", "weight_decay", "momentum",
               "grad_clip", "warmup_frac"):
    _check(np.isfinite(o[name]), f"optim.{name} must be finite")
  if not config.get("dry_run", False):  # a dry run initialises nothing
    check_distributed(config)


def _memory_rows(fraction: float, batch: int) -> int:
  """Memory rows of each batch with memory.mix=fraction (the rounding of
  ``loader.TaskBatches``, over the global batch)."""
  return int(round(fraction * batch))


def check_last_batch(config):
  """``keep`` batches one shuffled order of new and memory rows, as the
  baseline's ConcatDataset does: with a fixed memory share per batch there
  is no one last batch to keep."""
  _check(config.train.get("last_batch", "drop") != "keep"
         or config.memory.mix == "uniform",
         "train.last_batch=keep needs memory.mix=uniform (one shuffled order "
         "of new and memory rows, as the baseline's DataLoader has; "
         f"memory.mix={config.memory.mix!r} takes a fixed share per batch)")


def check_ddp_processes(train_cfg):
  """Each emulated DDP process gets an equal share of at least 2 rows
  (BatchNorm statistics of one row are the row itself)."""
  processes = train_cfg.get("ddp_processes", 1)
  batch = train_cfg.global_batch
  _check(processes == 1 or (batch % processes == 0
                            and batch // processes >= 2),
         f"train.ddp_processes={processes} must split train.global_batch="
         f"{batch} into equal shares of at least 2 rows (each emulated "
         "process normalises its own rows)")


def check_memory_fraction(fraction: float, batch: int):
  """memory.mix=fraction leaves every batch >= 1 new and >= 1 memory row
  (0 new rows divides by zero in the loader; 0 memory rows replays
  nothing)."""
  works = lambda f: 1 <= _memory_rows(f, batch) <= batch - 1  # noqa: E731
  if works(fraction):
    return
  _check(batch >= 2,
         f"memory.mix=fraction needs train.global_batch >= 2 (one new and "
         f"one memory row per batch), got {batch}; raise it or use "
         "memory.mix=uniform")
  mem = _memory_rows(fraction, batch)
  what = ("and 0 to new data" if mem >= batch
          else "(the run would replay nothing)")
  # The fractions whose rounding gives 1 .. batch - 1 rows.
  low, high = 0.5 / batch, (batch - 0.5) / batch
  span = (f"{'[' if works(low) else '('}{low:.6g}, {high:.6g}"
          f"{']' if works(high) else ')'}")
  raise UserError(
      f"memory.fraction={fraction} gives round({fraction} * {batch}) = {mem} "
      f"of the {batch} rows of each batch (train.global_batch={batch}) to "
      f"memory {what}; with memory.mix=fraction use memory.fraction in "
      f"{span} (1 to {batch - 1} memory rows) for this batch, or "
      "memory.mix=uniform")


def _cluster_detected() -> bool:
  """Whether JAX's cluster auto-detection finds a cluster here (SLURM, Open
  MPI, Kubernetes, Cloud TPU): what jax.distributed.initialize asks when
  the coordinator, process count or id is not given."""
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    envs = clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    return True  # cannot tell: leave it to jax.distributed.initialize
  for env in envs:
    if getattr(env, "opt_in_only_method", False):
      continue  # mpi4py: only when asked for by name, which we never do
    try:
      if env.is_env_present():
        return True
    except Exception:  # pylint: disable=broad-except
      return True  # cannot tell: leave it to jax.distributed.initialize
  return False


def check_distributed(config, environ=None):
  """``distributed=True``: what ``jax.distributed.initialize`` needs is
  given (config, then $JAX_* variables) or a cluster it auto-detects can
  supply it; otherwise it fails with a traceback."""
  if not config.distributed:
    return
  import jax  # pylint: disable=g-import-not-at-top
  if jax.distributed.is_initialized():
    return
  try:
    kwargs = parallel.distributed_kwargs(config.dist, environ)
  except UserError:
    raise
  except ValueError as e:  # int() of $JAX_NUM_PROCESSES / $JAX_PROCESS_ID
    raise UserError(f"distributed=True: $JAX_NUM_PROCESSES and "
                    f"$JAX_PROCESS_ID must be integers ({e})") from None
  address = kwargs.get("coordinator_address", "")
  if address:
    host, _, port = address.rpartition(":")
    _check(bool(host) and port.isdigit(),
           f"distributed=True: coordinator address {address!r} (from "
           "dist.coordinator_address or $JAX_COORDINATOR_ADDRESS) must be "
           "HOST:PORT, e.g. 10.0.0.1:1234")
  fields = {"coordinator_address": "dist.coordinator_address "
            "($JAX_COORDINATOR_ADDRESS)",
            "num_processes": "dist.num_processes ($JAX_NUM_PROCESSES)",
            "process_id": "dist.process_id ($JAX_PROCESS_ID)"}
  missing = [name for key, name in fields.items() if key not in kwargs]
  _check(not missing or _cluster_detected(),
         f"distributed=True but {', '.join(missing)} "
         f"{'is' if len(missing) == 1 else 'are'} not set, and JAX detects "
         "no cluster (SLURM, Open MPI, Kubernetes, Cloud TPU) to supply "
         f"{'it' if len(missing) == 1 else 'them'}; set "
         "--config.dist.coordinator_address=HOST:PORT, "
         "--config.dist.num_processes=N and --config.dist.process_id=I on "
         "every process, or drop --config.distributed=True on one host")


def check_protocol(config, num_classes: int):
  """The class split fits the dataset (a joint method has one task), and
  protocol.num_tasks asks for no more tasks than the split has."""
  method = methods.get_method(config.method)
  method.tasks(num_classes, config.protocol)
  p = config.protocol
  if method.joint or p.num_tasks <= 0:  # joint ignores it; -1 = every task
    return
  # task_blocks silently keeps the tasks there are; a larger count (e.g. to
  # extend a run on resume) is fine up to that.
  most = len(protocol.task_blocks(num_classes, p.base, p.increment))
  _check(p.num_tasks <= most,
         f"protocol.num_tasks={p.num_tasks} but setting "
         f"{protocol.setting_name(p.base, p.increment)} on {num_classes} "
         f"classes has {most} task(s); use protocol.num_tasks <= {most}, or "
         "-1 for every task")


def check_all(config, *, num_classes: int, num_devices: int,
              num_processes: int = 1, setting=None):
  """Every check that needs neither data nor a workdir (the run's own
  checks, in the run's order; tests call it directly)."""
  check_config(config, setting)
  check_protocol(config, num_classes)
  check_devices(config, num_devices, num_processes)
  check_conv_kernels(config)


def check_init_from(config, pretrain: bool = True) -> str | None:
  """``model.init_from`` checked before anything is built (the file or
  folder exists, is of the arch, passes its checksum); returns the path
  the weights load from ("" for a random init). ``upstream:auto`` is
  pretrained first when the cache lacks it; with ``pretrain=False`` (the
  dry run) only its value is checked, and None is returned."""
  from rebll_jax import upstream  # pylint: disable=g-import-not-at-top
  from rebll_jax.models import pretrained  # pylint: disable=g-import-not-at-top
  init_from = upstream.resolve_init_from(config, pretrain=pretrain)
  if init_from and os.path.isfile(init_from):  # converts at init
    pretrained.check_init_from_file(init_from, config.model.arch)
  elif init_from:
    pretrained.check_init_from(init_from, config.model.arch)
  return init_from


def build_source(cfg):
  """``data.build_source`` with file-system failures turned into one line."""
  try:
    return data.build_source(cfg)
  except UserError:
    raise
  except OSError as e:
    raise UserError(f"cannot read data.source={cfg.source!r} from "
                    f"{cfg.data_dir or '(no data_dir)'}: "
                    f"{e.strerror or e}") from None


def check_tasks(source, tasks, protocol_cfg):
  """Every task has training images, and test images of its seen classes
  (the rows it is scored on, ``protocol.eval_rows``), before any training.
  The seen classes only grow, so the first task is the one to lack them."""
  for task in tasks:
    names = [source.class_names[c] for c in task.classes]
    n_train = int(source.train.labels[:, task.classes].any(axis=1).sum())
    _check(n_train > 0, f"task {task.index + 1} has no training images "
           f"(classes {names}); use a class order or split where every "
           "task's classes occur in the training data")
  for task in tasks:
    names = [source.class_names[c] for c in task.seen]
    _check(protocol.eval_rows(source, task.seen, protocol_cfg).size > 0,
           f"the test split has no image of task {task.index + 1}'s classes "
           f"({names}), so the task cannot be scored; use a class order or "
           "split where they occur in the test data")


def tree_bytes(tree) -> int:
  """Bytes of every array leaf of ``tree``."""
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))


MIN_FREE_BYTES = 16 << 20  # logs, plots, results on top of the checkpoints


def check_disk_space(workdir: str, checkpoint_bytes: int):
  """The workdir's disk holds the kept checkpoints plus some slack."""
  need = int(checkpoint_bytes) + MIN_FREE_BYTES
  try:
    free = shutil.disk_usage(workdir).free
  except OSError as e:
    raise UserError(f"cannot stat workdir {workdir!r} ({e.strerror}); pick "
                    "another --workdir") from None
  _check(free >= need,
         f"workdir {workdir!r} has {free / 2**20:.0f} MiB free but the run "
         f"needs about {need / 2**20:.0f} MiB (checkpoints kept: "
         "train.keep_checkpoints); free space or pick another --workdir")


def check_conv_kernels(config):
  """``model.conv_impl=kernel`` needs the CPU and our compiled kernels;
  ``$REBLL_CPU_KERNEL_THREADS``, where set, is a thread count."""
  from rebll_jax.models import cpu_kernels  # pylint: disable=g-import-not-at-top
  try:
    cpu_kernels.forced_threads()
  except ValueError as e:
    raise UserError(f"{e}; unset it for the default") from None
  if config.model.get("conv_impl") != "kernel":
    return
  import jax  # pylint: disable=g-import-not-at-top
  _check(jax.default_backend() == "cpu",
         f"model.conv_impl=kernel runs on the CPU only (this run's backend: "
         f"{jax.default_backend()}); use model.conv_impl=auto")
  _check(cpu_kernels.available(),
         "model.conv_impl=kernel: the CPU kernels cannot be used here ("
         f"{cpu_kernels.unavailable_reason()}); use model.conv_impl=auto")


def check_devices(config, num_devices: int, num_processes: int):
  batch = config.train.global_batch
  # A CPU split by cpu_devices: say where the device count comes from.
  split = (f" (the CPU split by cpu_devices={config.cpu_devices}; "
           "--config.cpu_devices=0 keeps one device)"
           if config.get("cpu_devices", 0) == num_devices > 1 else "")
  _check(batch % num_devices == 0,
         f"train.global_batch={batch} is not divisible by the {num_devices} "
         f"devices{split}; use a multiple of {num_devices}")
  _check(config.train.eval_batch % num_devices == 0,
         f"train.eval_batch={config.train.eval_batch} is not divisible by "
         f"the {num_devices} devices{split}; use a multiple of {num_devices}")
  _check(batch % num_processes == 0,
         f"train.global_batch={batch} is not divisible by the "
         f"{num_processes} processes")


def check_workdir(workdir: str):
  """Creates the workdir and proves it writable (a probe file)."""
  _check(bool(workdir), "--workdir is required")
  _check(not os.path.exists(workdir) or os.path.isdir(workdir),
         f"workdir {workdir!r} is a file, not a directory; pick another "
         "--workdir")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".probe") as probe:
      probe.write(b"\0" * 4096)  # a full disk fails here, not mid-run
      probe.flush()
      os.fsync(probe.fileno())
  except OSError as e:
    raise UserError(f"workdir {workdir!r} is not writable ({e.strerror}); "
                    "pick another --workdir") from None
