"""MS-COCO 2014 (80 classes), the field's recipe; 20 exemplars per class.

  python -m rebll_jax.main --config=configs/coco.py:b0c10 \
      --config.data.data_dir=$HOME/rebll_data \
      --config.model.init_from=$HOME/weights/tresnet_m --workdir=workdirs/coco_b0c10

Expected cost on one GPU (an estimate, not a measurement): B0-C10 trains
about 160k image-visits x 20 epochs over its 8 tasks (an image is seen in
every task holding one of its classes) plus replay and the old model's
forward pass: roughly 3-5 GPU-hours on an A100/H100-class GPU fed by 16 host
cores (decoding JPEGs is the bottleneck below ~16 cores; see
experiments/bench_pipeline.py), 8-12 hours on a V100. B40-C10 costs about the
same. Disk: the prepared dataset is about 19 GB (the original JPEGs).

Prepare the data first (see README): ``python -m rebll_jax.prepare coco2014
--src DIR_WITH_ZIPS --data_dir $HOME/rebll_data``.

Settings (``--config=configs/coco.py:NAME``): ``b0c10`` (default, 8 tasks
of 10 classes), ``b40c10`` (40 then 4 x 10). ``NAME_field`` (``b0c10_field``,
``b40c10_field``) is the same setting with every row of the PyTorch
baseline's recipe and protocol (``config_base.apply_field_recipe``; README
"Field-exact mode"); its method stays ``rebll``: add
``--config.method=krt_baseline`` to reproduce the baseline's own numbers.

Recipe (METHOD.md section 7): lr 4e-5 for the first task, 1e-4 for the later
ones; memory 20 exemplars per class (herding).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _real_recipe  # noqa: E402  pylint: disable=g-import-not-at-top

from rebll_jax import config_base  # noqa: E402

SETTINGS = {"b0c10": (0, 10), "b40c10": (40, 10)}


def get_config(arg=None):
  setting, field = config_base.field_setting(arg, "b0c10")
  _, (base, increment) = _real_recipe.pick(SETTINGS, setting, "b0c10")
  c = _real_recipe.recipe("coco2014", lr_first=4e-5, lr_later=1e-4,
                          per_class=20)
  c.protocol.base, c.protocol.increment = base, increment
  if field:
    config_base.apply_field_recipe(c, dataset="coco")
  return c
