"""Synthetic benchmark (20 classes, 64 px), the embedded default.

  python -m rebll_jax.main --config=configs/synthetic.py --workdir=workdirs/syn

Settings (``--config=configs/synthetic.py:NAME``): ``b0c4`` (default, 5 tasks
of 4 classes), ``b10c2`` (10 then 5 x 2), ``b5c3`` (5 then 5 x 3), ``joint``
(one task, all 20 classes: the upper bound). ``NAME_field`` (``b0c4_field``,
``b10c2_field``, ``b5c3_field``) is the same setting with every row of the
PyTorch baseline's recipe and protocol (``config_base.apply_field_recipe``;
README "Field-exact mode").

Relabeling thresholds chosen on a validation split carved out of train
(``experiments/method_table.py --val``, B0-C4; README "Hyperparameters"):
the small model trained from scratch here is under-confident, so scores in
(0.05, 0.5] stay unknown instead of becoming negatives (two-threshold OR,
our reading), and ``asl_pl``'s pseudo-labels need a threshold of 0.9.
"""

from rebll_jax import config_base

SETTINGS = {
    "b0c4": (0, 4),
    "b10c2": (10, 2),
    "b5c3": (5, 3),
    "joint": (20, 20),
}


def get_config(arg=None):
  c = config_base.base_config()
  setting, field = config_base.field_setting(arg, "b0c4")
  if setting not in SETTINGS or (field and setting == "joint"):
    valid = sorted(SETTINGS) + [f"{s}_field" for s in SETTINGS
                                if s != "joint"]
    raise ValueError(f"unknown setting {arg!r}; valid: {sorted(valid)}")
  c.protocol.base, c.protocol.increment = SETTINGS[setting]
  c.relabel.tau_old_low = 0.05
  c.relabel.tau_cur_low = 0.05
  c.relabel.tau_pseudo = 0.9
  if setting == "joint":
    c.method = "joint"
  if field:
    config_base.apply_field_recipe(c, dataset="synthetic")
  return c
