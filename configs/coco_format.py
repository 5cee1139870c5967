"""Your own multi-label data in COCO instances format, the COCO recipe.

  python -m rebll_jax.main --config=configs/coco_format.py:b0c10 \
      --config.data.data_dir=$HOME/rebll_data/rebll_coco_format/NAME/1.0.0 \
      --workdir=workdirs/mydata

Expected cost on one GPU: about (images x tasks-per-image x 20 epochs) /
(~1,500 images/s on an A100/H100-class GPU with TResNet-M at 224), an
estimate; e.g. 10k images in 5 tasks: 5-10 minutes.

Prepare first: ``python -m rebll_jax.prepare coco_format --name NAME
--train_json A.json --test_json B.json --images IMAGE_DIR --data_dir
$HOME/rebll_data``. Classes are the category names sorted alphabetically.

The argument is the setting ``b{base}c{increment}``, any numbers (default
``b0c10``); a split that does not fit the dataset's class count is refused
before training, with the counts. 20 exemplars per class; lr 4e-5 then 1e-4.
``b{base}c{increment}_field`` adds every row of the PyTorch baseline's
recipe and protocol (``config_base.apply_field_recipe``, as COCO).
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _real_recipe  # noqa: E402  pylint: disable=g-import-not-at-top

from rebll_jax import config_base  # noqa: E402


def get_config(arg=None):
  setting, field = config_base.field_setting(arg, "b0c10")
  m = re.fullmatch(r"b(\d+)c(\d+)", setting)
  if not m:
    raise ValueError(f"setting {setting!r}: use b{{base}}c{{increment}}, "
                     "e.g. b0c10 or b40c10 (add _field for the baseline's "
                     "recipe)")
  c = _real_recipe.recipe("coco_format", lr_first=4e-5, lr_later=1e-4,
                          per_class=20)
  c.protocol.base, c.protocol.increment = int(m.group(1)), int(m.group(2))
  if field:
    config_base.apply_field_recipe(c, dataset="coco")
  return c
