"""Command line: ``python -m rebll_jax.main --config=FILE[:SETTING] --workdir=DIR``.

Any config field can be overridden with ``--config.a.b=value``. Rerunning the
same command on the same workdir resumes from its last checkpoint. A mistake
in the input (unknown key, a split that does not fit, a batch the devices
cannot share, an unwritable workdir) prints one line and exits with code 2.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from rebll_jax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None,
    "Config file, optionally with a setting: configs/synthetic.py:b10c2. "
    "Override any field with --config.FIELD=VALUE (e.g. --config.method=ft, "
    "--config.train.global_batch=128).",
    lock_config=True)
flags.DEFINE_string("workdir", None,
                    "Output directory: checkpoints, results.json, "
                    "metrics.jsonl, TensorBoard events, plots. Rerunning on "
                    "it resumes.")

EXIT_USER_ERROR = 2


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def _parse(argv):
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e}. Run with --help for the flags.")
  except (KeyError, AttributeError, ValueError, TypeError) as e:
    # ml_collections reports unknown keys and bad values this way.
    message = str(e).strip("'\"")
    _fail(f"bad --config override: {message}. Every key must exist in the "
          "config file; see rebll_jax/config_base.py for the fields.")
  except (OSError, SyntaxError) as e:
    _fail(f"cannot load the config file: {e}")
  return None


def main(argv):
  del argv
  if FLAGS.config is None:
    _fail("--config is required, e.g. --config=configs/synthetic.py")
  if not FLAGS.workdir:
    _fail("--workdir is required, e.g. --workdir=workdirs/synthetic")
  # Quiet the libraries' INFO chatter; keep ours.
  absl_logging.set_verbosity(absl_logging.WARNING)
  ours = logging.getLogger("rebll_jax")
  ours.setLevel(logging.INFO)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(message)s"))
  ours.addHandler(handler)
  ours.propagate = False
  from rebll_jax import reporting, train  # pylint: disable=g-import-not-at-top
  try:
    results = train.run(FLAGS.config, FLAGS.workdir)
  except UserError as e:
    _fail(str(e))
  except train.NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(reporting.final_table(results))
  print(f"results: {FLAGS.workdir}/results.json")


def run():
  app.run(main, flags_parser=_parse)


if __name__ == "__main__":
  run()
