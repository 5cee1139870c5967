"""Every method is a configuration of one trainer.

A ``Method`` says which columns the classification loss reads, how unknown
labels are treated, which distillation runs, whether replay and relabeling
(METHOD.md section 5) are on. Loss knobs (gammas, margin, beta, thresholds)
come from ``config.loss`` / ``config.relabel``; a method only fixes what
defines it (e.g. ASL's gammas for ``asl_pl``, beta = 0 for plain distillation).
"""

from __future__ import annotations

import dataclasses

from rebll_jax.errors import UserError

BCE = dict(g_pos=0.0, g_neg=0.0, margin=0.0, w_pos=1.0, w_neg=1.0)
ASL = dict(g_pos=0.0, g_neg=4.0, margin=0.05, w_pos=1.0, w_neg=1.0)


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  description: str
  cls_columns: str = "current"  # "current" | "seen"
  # Unknown entries of the cls columns count as negatives (the defect of
  # naive replay/fine-tuning); otherwise they are masked out of L_cls.
  unknown_as_negative: bool = False
  cls_loss: dict | None = None  # fixed (g_pos, ...); None = config.loss
  distill: str = "none"  # "none" | "plain" (beta=0) | "asymmetric"
  replay: bool = False
  relabel_new_online: bool = False  # past model: new rows x old classes
  relabel_memory_online: bool = False  # current model: memory x new classes
  relabel_between_tasks: bool = False  # buffer pass after each task
  # Threshold of the past model's labels on new rows: "or" reads
  # relabel.tau_old / tau_old_low; "pseudo" reads relabel.tau_pseudo alone
  # (the fixed pseudo-label threshold of the KRT-style baseline).
  old_threshold: str = "or"
  joint: bool = False  # one task over all classes (upper bound)


METHODS = {m.name: m for m in [
    Method("ft", "fine-tuning: BCE on the current task's columns",
           cls_loss=BCE),
    Method("lwf", "BCE + plain distillation on old classes", cls_loss=BCE,
           distill="plain"),
    Method("er", "replay; unknown labels on seen columns taken as negatives",
           cls_columns="seen", unknown_as_negative=True, cls_loss=BCE,
           replay=True),
    Method("asl_pl", "ASL on seen columns, past-model pseudo-labels for old "
           "classes at a fixed threshold, herding replay (KRT without its "
           "attention head)", cls_columns="seen", unknown_as_negative=True,
           cls_loss=ASL, replay=True, relabel_new_online=True,
           old_threshold="pseudo"),
    Method("rebll", "AKD (asymmetric cls + decayed distillation) + OR + "
           "replay", cls_columns="seen", distill="asymmetric", replay=True,
           relabel_new_online=True, relabel_memory_online=True,
           relabel_between_tasks=True),
    Method("rebll_akd", "AKD without OR (unknown labels taken as negatives)",
           cls_columns="seen", unknown_as_negative=True,
           distill="asymmetric", replay=True),
    Method("rebll_or", "OR with plain BCE and plain distillation",
           cls_columns="seen", cls_loss=BCE, distill="plain", replay=True,
           relabel_new_online=True, relabel_memory_online=True,
           relabel_between_tasks=True),
    Method("joint", "upper bound: one task, all classes, full labels",
           cls_loss=BCE, joint=True),
]}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise UserError(f"unknown method {name!r}; valid: {sorted(METHODS)}")
  return METHODS[name]


def cls_loss_params(method: Method, loss_cfg) -> dict:
  if method.cls_loss is not None:
    return dict(method.cls_loss)
  return dict(g_pos=loss_cfg.g_pos, g_neg=loss_cfg.g_neg,
              margin=loss_cfg.margin, w_pos=loss_cfg.w_pos,
              w_neg=loss_cfg.w_neg)


def distill_params(method: Method, loss_cfg) -> dict:
  beta = loss_cfg.beta if method.distill == "asymmetric" else 0.0
  adaptive = loss_cfg.adaptive if method.distill == "asymmetric" else False
  return dict(temperature=loss_cfg.temperature, beta=beta, adaptive=adaptive)


def relabel_thresholds(method: Method, relabel_cfg) -> dict:
  """tau_old, tau_old_low, tau_cur, tau_cur_low for the relabel functions.

  A lower threshold < 0 in config means "same as the upper one" (METHOD.md's
  single threshold); see ``relabel.decide``.
  """
  low = lambda value, tau: tau if value < 0 else value  # noqa: E731
  if method.old_threshold == "pseudo":
    tau_old = tau_old_low = relabel_cfg.tau_pseudo
  else:
    tau_old = relabel_cfg.tau_old
    tau_old_low = low(relabel_cfg.tau_old_low, tau_old)
  return dict(tau_old=tau_old, tau_old_low=tau_old_low,
              tau_cur=relabel_cfg.tau_cur,
              tau_cur_low=low(relabel_cfg.tau_cur_low, relabel_cfg.tau_cur))
