"""Every method is a configuration of one trainer, and owns its decisions.

A ``Method`` answers the questions the trainer asks, and nothing else reads
its fields:

- ``tasks(...)``: the protocol's task blocks (one task over all classes for
  the joint upper bound);
- ``loss_columns(context)`` and ``loss_targets(labels, known, columns)``:
  which columns the classification loss reads, and what unknown labels
  become there (masked, or taken as negatives: the defect of naive replay);
- ``cls_loss_params(loss_cfg)``: the asymmetric-BCE knobs (fixed by the
  method, e.g. BCE or ASL, or read from ``config.loss``);
- ``distill_params(loss_cfg)``: ``None`` or the distillation's knobs;
- ``thresholds(relabel_cfg)``: the relabel thresholds it applies;
- flags for the mechanisms it switches on (replay, online relabeling of
  new rows / memory rows, the between-task buffer pass).

Enumerated fields are checked at construction. ``ignored_config(config)``
lists the overrides the method would silently ignore (``loss`` knobs it does
not use, ``relabel`` thresholds it never applies); the config validation
turns them into an error. Adding a method that recombines existing
mechanisms is one entry in ``METHODS``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from rebll_jax import protocol
from rebll_jax.errors import UserError

BCE = dict(g_pos=0.0, g_neg=0.0, margin=0.0, w_pos=1.0, w_neg=1.0)
ASL = dict(g_pos=0.0, g_neg=4.0, margin=0.05, w_pos=1.0, w_neg=1.0)
# The PyTorch baseline trainer's ASL: its eps floors both log arguments.
ASL_FIELD = dict(ASL, prob_floor=1e-8)

CLS_COLUMNS = ("current", "seen")
UNKNOWN_LABELS = ("masked", "negative")
# plain / asymmetric: sigmoid-BCE toward the past model's logits (beta = 0
# for plain); pod_flat: 1 - cos of pooled embeddings (the baseline trainer).
DISTILL_KINDS = ("none", "plain", "asymmetric", "pod_flat")
OLD_THRESHOLDS = ("or", "pseudo")
CLS_REDUCTIONS = ("mean", "sum")  # of L_cls over the batch's examples

# config.loss fields each part of a method reads.
_CLS_KNOBS = ("g_pos", "g_neg", "margin", "w_pos", "w_neg")
_KD_KNOBS = ("lambda_kd", "temperature")
_ASYMMETRIC_KD_KNOBS = ("beta", "adaptive", "decay_on")
_POD_FLAT_KNOBS = ("pod_flat_weight",)
_ALWAYS_READ = ("reduction",)


def _choose(value: str, valid: tuple[str, ...], what: str) -> str:
  if value not in valid:
    raise ValueError(f"{what} must be one of {valid}, got {value!r}")
  return value


@dataclasses.dataclass(frozen=True)
class Method:
  """One method: which loss columns, labels, distillation, replay, relabels."""

  name: str
  description: str
  cls_columns: str = "current"  # CLS_COLUMNS
  unknown_labels: str = "masked"  # UNKNOWN_LABELS
  cls_loss: dict | None = None  # fixed (g_pos, ...); None = config.loss
  cls_reduction: str = "mean"  # CLS_REDUCTIONS; config.loss.reduction wins
  distill: str = "none"  # DISTILL_KINDS: plain = beta 0, no renormalising
  replay: bool = False
  relabel_new_online: bool = False  # past model: new rows x old classes
  relabel_memory_online: bool = False  # current model: memory x new classes
  relabel_between_tasks: bool = False  # buffer pass after each task
  # Threshold of the past model's labels on new rows: "or" reads
  # relabel.tau_old / tau_old_low; "pseudo" reads relabel.tau_pseudo alone
  # (the fixed pseudo-label threshold of the KRT-style baseline).
  old_threshold: str = "or"  # OLD_THRESHOLDS
  joint: bool = False  # one task over all classes (upper bound)

  def __post_init__(self):
    _choose(self.cls_columns, CLS_COLUMNS, f"{self.name}: cls_columns")
    _choose(self.unknown_labels, UNKNOWN_LABELS, f"{self.name}: unknown_labels")
    _choose(self.distill, DISTILL_KINDS, f"{self.name}: distill")
    _choose(self.old_threshold, OLD_THRESHOLDS, f"{self.name}: old_threshold")
    _choose(self.cls_reduction, CLS_REDUCTIONS, f"{self.name}: cls_reduction")
    if self.cls_loss is not None and (
        set(self.cls_loss) - {"prob_floor"} != set(_CLS_KNOBS)):
      raise ValueError(f"{self.name}: cls_loss needs exactly {_CLS_KNOBS} "
                       "(and optionally prob_floor)")
    if (self.relabel_memory_online or self.relabel_between_tasks) and (
        not self.replay):
      raise ValueError(f"{self.name}: memory relabeling needs replay")

  # ------------------------------------------------------------- protocol --

  def tasks(self, num_classes: int, protocol_cfg) -> list[protocol.Task]:
    if self.joint:
      return protocol.make_tasks(num_classes, num_classes, num_classes)
    return protocol.make_tasks(num_classes, protocol_cfg.base,
                               protocol_cfg.increment, protocol_cfg.num_tasks)

  # -------------------------------------------------- classification loss --

  def loss_columns(self, context):
    """[C] 0/1 mask of the columns ``L_cls`` reads in this task."""
    return (context["current_mask"] if self.cls_columns == "current"
            else context["seen_mask"])

  def loss_targets(self, labels, known, columns):
    """(targets, mask) for ``L_cls`` from the labels the trainer may see."""
    if self.unknown_labels == "negative":
      return labels * known, jnp.broadcast_to(columns, labels.shape)
    return labels, known * columns

  def cls_loss_params(self, loss_cfg) -> dict:
    if self.cls_loss is not None:
      return dict(self.cls_loss)
    return {k: loss_cfg[k] for k in _CLS_KNOBS}

  def reduction(self, loss_cfg) -> str:
    """How ``L_cls`` is reduced over examples (``loss.reduction`` overrides
    the method's own; "" keeps it)."""
    return loss_cfg.get("reduction", "") or self.cls_reduction

  # --------------------------------------------------------- distillation --

  def distill_params(self, loss_cfg) -> dict | None:
    """None without logit distillation, else the knobs of ``L_kd``."""
    if self.distill in ("none", "pod_flat"):
      return None
    asymmetric = self.distill == "asymmetric"
    return dict(temperature=loss_cfg.temperature,
                beta=loss_cfg.beta if asymmetric else 0.0,
                adaptive=loss_cfg.adaptive if asymmetric else False,
                decay_on=loss_cfg.decay_on if asymmetric else "confidence")

  def past_model_temperature(self, loss_cfg) -> float:
    """T of METHOD.md's q = sigmoid(z'/T), which the past model's relabels
    threshold as the distillation reads it: ``loss.temperature`` for a
    method with logit distillation, 1 for the others (their q is the plain
    sigmoid; they do not read the field)."""
    params = self.distill_params(loss_cfg)
    return 1.0 if params is None else float(params["temperature"])

  # ----------------------------------------------------------- relabeling --

  def thresholds(self, relabel_cfg) -> dict:
    """tau_old, tau_old_low, tau_cur, tau_cur_low for the relabel functions.

    A lower threshold < 0 in config means "same as the upper one" (METHOD.md's
    single threshold); see ``relabel.decide``.
    """
    low = lambda value, tau: tau if value < 0 else value  # noqa: E731
    if self.old_threshold == "pseudo":
      tau_old = tau_old_low = relabel_cfg.tau_pseudo
    else:
      tau_old = relabel_cfg.tau_old
      tau_old_low = low(relabel_cfg.tau_old_low, tau_old)
    return dict(tau_old=tau_old, tau_old_low=tau_old_low,
                tau_cur=relabel_cfg.tau_cur,
                tau_cur_low=low(relabel_cfg.tau_cur_low, relabel_cfg.tau_cur))

  def labels_old_classes_of_exemplars(self, task) -> bool:
    """New exemplars get the past model's labels on old classes (below the
    diagonal) before they are stored."""
    return self.relabel_between_tasks and task.index > 0

  def relabels_buffer_after(self, task) -> bool:
    """The trained model writes ``task``'s columns of older buffer rows."""
    return self.relabel_between_tasks and task.index > 0

  # --------------------------------------------------------------- config --

  def loss_knobs_read(self) -> tuple[str, ...]:
    """The ``config.loss`` fields this method reads."""
    read = _ALWAYS_READ + (() if self.cls_loss is not None else _CLS_KNOBS)
    if self.distill in ("plain", "asymmetric"):
      read += _KD_KNOBS
    if self.distill == "asymmetric":
      read += _ASYMMETRIC_KD_KNOBS
    if self.distill == "pod_flat":
      read += _POD_FLAT_KNOBS
    return read

  def relabel_knobs_ignored(self) -> tuple[str, ...]:
    """``config.relabel`` fields this method certainly never reads."""
    relabels = (self.relabel_new_online or self.relabel_memory_online or
                self.relabel_between_tasks)
    if not relabels:
      return ("*",)
    if self.old_threshold == "pseudo":
      return ("tau_old", "tau_old_low")
    return ("tau_pseudo",)

  def ignored_config(self, config, defaults,
                     loss_only: bool = False) -> dict[str, str]:
    """Fields changed from ``defaults`` that this method does not read (an
    override that would silently do nothing), each with the reason:
    ``loss`` knobs it does not use, ``relabel`` thresholds it never applies
    (unless ``loss_only``). ``memory`` fields are not judged: a sweep sets
    them once for every method, replaying or not."""
    ignored = {}
    read = self.loss_knobs_read()
    why = f"it reads loss.{{{', '.join(read)}}}"
    for k in config.loss:
      if k not in read and config.loss[k] != defaults.loss[k]:
        ignored[f"loss.{k}"] = why
    if loss_only:
      return ignored
    skip = self.relabel_knobs_ignored()
    if "*" in skip:
      why = "it relabels nothing"
    else:
      why = "its old-class threshold is relabel." + (
          "tau_pseudo" if self.old_threshold == "pseudo" else "tau_old")
    for k in config.relabel:
      if ("*" in skip or k in skip) and (
          config.relabel[k] != defaults.relabel[k]):
        ignored[f"relabel.{k}"] = why
    return ignored


METHODS = {m.name: m for m in [
    # METHOD.md's fine-tune baseline: unknown labels taken as negatives is
    # its defect (old classes are pushed to 0 on the new task's images).
    Method("ft", "fine-tuning: BCE on the seen columns, unknown labels "
           "taken as negatives", cls_columns="seen",
           unknown_labels="negative", cls_loss=BCE),
    Method("ft_masked", "fine-tuning on the current task's columns only "
           "(`ft` until 2026-12-08)", cls_loss=BCE),
    Method("lwf", "BCE + plain distillation on old classes", cls_loss=BCE,
           distill="plain"),
    Method("er", "replay; unknown labels on seen columns taken as negatives",
           cls_columns="seen", unknown_labels="negative", cls_loss=BCE,
           replay=True),
    Method("asl_pl", "ASL on seen columns, past-model pseudo-labels for old "
           "classes at a fixed threshold, herding replay (KRT without its "
           "attention head)", cls_columns="seen", unknown_labels="negative",
           cls_loss=ASL, replay=True, relabel_new_online=True,
           old_threshold="pseudo"),
    Method("rebll", "AKD (asymmetric cls + decayed distillation) + OR + "
           "replay", cls_columns="seen", distill="asymmetric", replay=True,
           relabel_new_online=True, relabel_memory_online=True,
           relabel_between_tasks=True),
    Method("rebll_akd", "AKD without OR (unknown labels taken as negatives)",
           cls_columns="seen", unknown_labels="negative",
           distill="asymmetric", replay=True),
    Method("rebll_or", "OR with plain BCE and plain distillation",
           cls_columns="seen", cls_loss=BCE, distill="plain", replay=True,
           relabel_new_online=True, relabel_memory_online=True,
           relabel_between_tasks=True),
    Method("krt_baseline", "the PyTorch baseline trainer (KRT code): ASL "
           "summed over batch and seen columns, unknown labels as 0 targets, "
           "POD-flat distillation of pooled features, herding replay",
           cls_columns="seen", unknown_labels="negative", cls_loss=ASL_FIELD,
           cls_reduction="sum", distill="pod_flat", replay=True),
    Method("joint", "upper bound: one task, all classes, full labels",
           cls_loss=BCE, joint=True),
]}


def definition(name: str) -> dict:
  """What method ``name`` computes (its fields but the name and the
  description): part of a run's fingerprint, so a checkpoint never resumes
  under a method whose definition changed. {} for a name that is not a
  method (the config check refuses it)."""
  if name not in METHODS:
    return {}
  spec = dataclasses.asdict(METHODS[name])
  return {k: v for k, v in spec.items() if k not in ("name", "description")}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise UserError(f"unknown method {name!r}; valid: {sorted(METHODS)}")
  return METHODS[name]
