"""The recipe of the field (METHOD.md section 7) shared by the real configs.

TResNet-M at 224 x 224, inputs in [0, 1] (no mean/std), Cutout + RandAugment
(rebll_jax/data/augment.py), Adam, L2 1e-4 on kernels, one-cycle with 20%
warm-up rebuilt each task, 20 epochs per task, global batch 128. The
pretrained backbone is not set here: convert one with
``python -m rebll_jax.convert`` and pass ``--config.model.init_from=DIR``
(without it the backbone starts from random weights and scores far lower).
"""

from rebll_jax import config_base


def recipe(source: str, lr_first: float, lr_later: float, per_class: int):
  c = config_base.base_config()
  c.data.source = source
  c.data.image_size = 224
  c.data.normalize = False
  c.data.num_workers = 16
  c.model.arch = "tresnet_m"
  c.optim.name = "adam"
  c.optim.lr_first = lr_first
  c.optim.lr_later = lr_later
  c.optim.weight_decay = 1e-4
  c.optim.schedule = "one_cycle"
  c.optim.warmup_frac = 0.2
  c.train.global_batch = 128
  c.train.epochs_first = 20
  c.train.epochs_later = 20
  c.train.eval_batch = 256
  c.train.log_every = 50
  c.train.checkpoint_every = 1000
  c.augment.flip = True
  c.augment.cutout = 0.5
  c.augment.randaugment_ops = 2
  c.augment.randaugment_magnitude = 0.3
  c.memory.per_class = per_class
  c.memory.total = 0
  c.memory.selection = "herding"
  return c


def pick(settings: dict, arg, default: str):
  setting = arg or default
  if setting not in settings:
    raise ValueError(f"unknown setting {setting!r}; valid: {sorted(settings)} "
                     "(each also as NAME_field: the baseline's recipe)")
  return setting, settings[setting]
