"""Tiny setting for tests: 3 tasks on a small synthetic set, seconds on CPU.

  python -m rebll_jax.main --config=configs/test.py --workdir=/tmp/rebll_test
"""

from rebll_jax import config_base


def get_config(arg=None):
  if arg:  # one setting only: a name after ':' would be silently ignored
    raise ValueError(f"configs/test.py has no settings (got {arg!r}); use "
                     "it without ':'")
  c = config_base.base_config()
  c.data.image_size = 32
  c.data.synthetic.num_train = 240
  c.data.synthetic.num_test = 120
  c.data.synthetic.render_size = 32
  c.protocol.base = 0
  c.protocol.increment = 4
  c.protocol.num_tasks = 3
  c.model.width = 8
  c.model.stage_sizes = (1, 1)
  c.train.global_batch = 16
  c.train.epochs_first = 1
  c.train.epochs_later = 1
  c.train.eval_batch = 64
  c.train.log_every = 4
  c.train.progress = False
  c.memory.per_class = 2
  return c
