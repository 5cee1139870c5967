"""Command line: ``python -m rebll_jax.main --config=FILE[:SETTING] --workdir=DIR``.

Any config field can be overridden with ``--config.a.b=value``. Rerunning the
same command on the same workdir resumes from its last checkpoint. A mistake
in the input (a config file that is missing, raises or returns something
other than a ConfigDict; an unknown key; a value out of range; a split that
does not fit; a batch the devices cannot share; an unwritable workdir) prints
one line and exits with code 2. A non-finite loss, or a disk that fills up
during a save, prints one line and exits with code 1. Ctrl-C exits with 130;
SIGTERM saves a checkpoint at the next step and exits with 143.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
import ml_collections
from ml_collections import config_flags

from rebll_jax.errors import NoSpaceError, UserError

FLAGS = flags.FLAGS
# The --config file's config as get_config() returned it (no overrides).
_FILE_CONFIG: dict = {}
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
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130  # the shell's code for a run ended by Ctrl-C
# 128 + SIGTERM: the run saved and stopped on a scheduler's SIGTERM
# (rebll_jax/preemption.py); a retry loop sees a run that did not finish.
EXIT_PREEMPTED = 143
# Path fields where a leading ~ means the home directory (the shell does not
# expand it inside --config.a.b=~/x).
_PATH_FIELDS = (("data", "data_dir"), ("model", "init_from"))


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def _unquote(text: str) -> str:
  """Drops one pair of quotes around the whole text (KeyError's repr)."""
  text = str(text)
  if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
    return text[1:-1]
  return text


class _ConfigFileError(Exception):
  """The config file could not give a config; the message is the line.

  Not a ValueError/TypeError, so absl passes it through unwrapped.
  """


def _describe(value) -> str:
  if value is None:
    return "None"
  return f"a {type(value).__name__}"


def _checked_config_loader(parse, remember: bool = True):
  """Wraps the --config file parser: every way a file fails is one line.
  ``remember``: keep the file's own config for ``main`` (_FILE_CONFIG)."""

  def load(spec: str):
    path = spec.split(":", 1)[0]
    if not path:
      raise _ConfigFileError(f"--config={spec} names no file; pass e.g. "
                             "--config=configs/synthetic.py")
    if not os.path.isfile(path):
      raise _ConfigFileError(f"config file {path!r} not found; pass e.g. "
                             "--config=configs/synthetic.py")
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    # ml_collections logs "returned None" itself: we say it in one line.
    absl_log.setLevel(logging.ERROR)
    try:
      config = parse(spec)
    except Exception as e:  # pylint: disable=broad-except
      raise _ConfigFileError(_config_error(e, spec)) from None
    finally:
      absl_log.setLevel(level)
    if not isinstance(config, ml_collections.ConfigDict):
      raise _ConfigFileError(
          f"config {spec!r}: get_config() returned {_describe(config)}, not "
          "an ml_collections.ConfigDict; start it from "
          "rebll_jax.config_base.base_config()")
    # The setting as the file makes it, before --config.* overrides apply
    # (validate.check_config tells a setting's knob from an override).
    if remember:
      _FILE_CONFIG["last"] = copy.deepcopy(config)
    return config

  return load


FLAGS["config"].parser.parse = _checked_config_loader(
    FLAGS["config"].parser.parse)


def _fail(message: str):
  """One line on stderr, exit code 2: the CLI's answer to bad input."""
  print(f"error: {_one_line(message)}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def _root_cause(error: BaseException) -> BaseException:
  """The innermost exception of a chain (ml_collections wraps the real one)."""
  seen = set()
  while id(error) not in seen:
    seen.add(id(error))
    inner = error.__cause__ or error.__context__
    if inner is None:
      break
    error = inner
  return error


def _config_arg(argv) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def _config_error(error: BaseException, spec: str) -> str:
  """One line for a config file that cannot be loaded or built."""
  path = spec.split(":", 1)[0]
  if path and not os.path.isfile(path):
    return (f"config file {path!r} not found; pass e.g. "
            "--config=configs/synthetic.py")
  root = _root_cause(error)
  text = str(root).strip()
  if "Traceback" in text:  # a wrapper that pasted a traceback: keep the end
    text = text.splitlines()[-1]
    prefix = f"{type(root).__name__}: "
    text = text[len(prefix):] if text.startswith(prefix) else text
  if isinstance(root, KeyError):
    text = _unquote(text)
  if isinstance(root, AttributeError) and "get_config" in text:
    return f"config file {path!r} defines no get_config() function"
  return (f"cannot load config {spec!r}: {type(root).__name__}: "
          f"{_one_line(text)}")


def _override_named(key: str, argv) -> str:
  """The --config.a.b override of ``argv`` that mentions ``key``."""
  for arg in argv:
    if arg.startswith("--config."):
      path = arg[len("--config."):].split("=", 1)[0]
      if key in path.split("."):
        return path
  return key


def _unknown_key_message(text: str, argv) -> str:
  """One line for ml_collections' unknown-key error, with its suggestion.

  Its message is the key in quotes, sometimes followed by a line 'Did you
  mean "x" instead of "y"?'; a KeyError's str() then escapes it all.
  """
  name = re.search(r"[A-Za-z_]\w*", text)
  key = name.group(0) if name else _unquote(text)
  path = _override_named(key, argv)
  message = f"unknown config key {path!r}"
  hint = re.search(r'Did you mean \\*"(\w+)\\*"', text)
  if hint:
    parts = [hint.group(1) if p == key else p for p in path.split(".")]
    message += f" (did you mean {'.'.join(parts)!r}?)"
  return message + _where_the_fields_are(path)


def _where_the_fields_are(key: str) -> str:
  """The end of an unknown-key line: where the user finds the fields."""
  if key.startswith("upstream."):
    return ("; the upstream.* block exists in the pretrained_* settings of "
            "configs/synthetic.py only (its fields: "
            "rebll_jax/upstream.py, default_config)")
  return ("; every --config.KEY must exist in the config (see "
          "rebll_jax/config_base.py for the fields)")


def _exception_text(error: BaseException) -> str:
  """An exception's message on one line; several args (absl's boolean
  parser: ('Non-boolean argument to boolean flag', 'maybe')) joined by
  ': ' rather than shown as a tuple."""
  if len(error.args) > 1:
    return _one_line(": ".join(str(a) for a in error.args))
  return _one_line(error)


def _parse_into(values, argv):
  """``values(argv)``: the CLI's flag parsing. A bad ``--config`` or
  ``--config.KEY=VALUE`` is a UserError whose message is the CLI's line."""
  # absl defines --help, -?, --helpshort and --helpfull, not -h.
  argv = ["--help" if arg == "-h" else arg for arg in argv]
  try:
    rest = values(argv)
  except _ConfigFileError as e:
    raise UserError(str(e)) from None
  except SystemExit:
    if set(argv[1:]) & {"--help", "-h", "-?", "--helpshort", "--helpfull"}:
      sys.exit(0)  # absl exits 1 after printing the help; asking is no error
    raise
  except flags.Error as e:
    message = str(e).split("\n", 1)[0]
    if message.startswith("flag --config=") or message.startswith(
        "flag --config:"):
      raise UserError(_config_error(e, _config_arg(argv))) from None
    if message.startswith("flag --config."):
      detail = _exception_text(_root_cause(e))
      raise UserError(
          f"bad value in {message.split(':', 1)[0][5:]}: {detail}") from None
    if "Unknown command line flag 'config." in message:
      key = message.split("'")[1][len("config."):]
      raise UserError(f"unknown config key {key!r}"
                      + _where_the_fields_are(key)) from None
    raise UserError(f"{message}. Run with --help for the flags.") from None
  except (KeyError, AttributeError) as e:
    # ml_collections reports an unknown key this way.
    raise UserError(_unknown_key_message(str(e), argv)) from None
  except (ValueError, TypeError) as e:
    raise UserError(f"bad --config override: {e}") from None
  except (OSError, SyntaxError, ImportError) as e:
    raise UserError(_config_error(e, _config_arg(argv))) from None
  try:
    if values.config is not None:
      values.config.keys()  # the file loads lazily: surface its errors here
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(_config_error(e, _config_arg(argv))) from None
  return rest


def _parse(argv):
  try:
    return _parse_into(FLAGS, argv)
  except UserError as e:
    _fail(str(e))


def build_config(argv) -> ml_collections.ConfigDict:
  """The config ``python -m rebll_jax.main`` runs for these flags
  (``--config=FILE[:SETTING]`` and ``--config.KEY=VALUE``; no
  ``--workdir``), parsed exactly as the CLI parses them, with nothing run:
  for a script that must know what a run's config is or was (e.g.
  experiments/method_table.py, before it reuses a finished run). A value
  the CLI refuses is a UserError with the CLI's one line."""
  argv = ["rebll_jax.main", *argv]
  values = flags.FlagValues()
  # Its own flag set: the process's FLAGS (and the --config file the CLI
  # remembers, _FILE_CONFIG) stay untouched.
  config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values["config"].parser.parse = _checked_config_loader(
      values["config"].parser.parse, remember=False)
  _parse_into(values, argv)
  if values.config is None:
    raise UserError("--config is required, e.g. --config=configs/synthetic.py")
  _expand_home(values.config, "")
  return values.config


def _expand_home(config, workdir: str) -> str:
  """``~`` in the workdir and the config's path fields, as a shell would."""
  for section, field in _PATH_FIELDS:
    block = config.get(section)  # a partial config is refused later
    value = block.get(field) if block is not None else None
    if isinstance(value, str) and value.startswith("~"):
      block[field] = os.path.expanduser(value)
  return os.path.expanduser(workdir)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected argument(s) {argv[1:]}; flags take the form "
          "--name=value (did you mean --config.KEY=VALUE?)")
  if FLAGS.config is None:
    _fail("--config is required, e.g. --config=configs/synthetic.py")
  if not FLAGS.workdir:
    _fail("--workdir is required, e.g. --workdir=workdirs/synthetic")
  workdir = _expand_home(FLAGS.config, FLAGS.workdir)
  from rebll_jax import config_checks  # pylint: disable=g-import-not-at-top
  try:
    config_checks.check_values(FLAGS.config)  # before JAX is even imported
  except UserError as e:
    _fail(str(e))
  # Quiet the libraries' INFO chatter; keep ours.
  absl_logging.set_verbosity(absl_logging.WARNING)
  ours = logging.getLogger("rebll_jax")
  ours.setLevel(logging.INFO)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(message)s"))
  ours.addHandler(handler)
  ours.propagate = False
  from rebll_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  split = xla_cpu.split_host_cpu(FLAGS.config.get("cpu_devices", 0))
  if split:
    ours.info(split)
  from rebll_jax import preemption, reporting, train  # pylint: disable=g-import-not-at-top
  try:
    setting = _FILE_CONFIG.get("last")
    results = train.run(FLAGS.config, workdir, setting)
  except UserError as e:
    _fail(str(e))
  except KeyboardInterrupt:
    print(f"\ninterrupted; the checkpoints in {workdir} are kept: the same "
          "command resumes from the newest", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
  except preemption.Preempted as e:
    print(_one_line(e), file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)
  except train.NonFiniteLossError as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    sys.exit(EXIT_RUN_FAILED)
  except NoSpaceError as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    # Nothing more can be written: the exit handlers that flush logs and
    # event files would each fail with a traceback of their own. The last
    # checkpoint is committed; a rerun resumes from it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_RUN_FAILED)  # pylint: disable=protected-access
  if FLAGS.config.get("dry_run", False):
    from rebll_jax import dry_run  # pylint: disable=g-import-not-at-top
    print(dry_run.table(results))
    print(f"protocol: {os.path.join(workdir, 'protocol.json')}")
    return
  print(reporting.final_table(results))
  print(f"results: {workdir}/results.json")


def run():
  app.run(main, flags_parser=_parse)


if __name__ == "__main__":
  run()
