"""Bad input: the CLI's error paths and a property search over the config.

Every mistake a user can make ends in exactly one line on stderr starting
with ``error:``, exit code 2, no traceback, before anything is compiled. The
CLI cases run in subprocesses (8 virtual CPU devices); the hypothesis search
runs the same checks in process (``validate.check_all``: config, protocol,
devices), so it can try hundreds of configs in seconds.
"""

import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap

import hypothesis
from hypothesis import strategies as st
import ml_collections
import numpy as np
import pytest

from rebll_jax import config_base, config_checks, main, protocol, train
from rebll_jax import validate
from rebll_jax.data.base import Source, Split
from rebll_jax.errors import UserError
from tests.helpers import make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT
  return env


def _cli(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "rebll_jax.main", *args],
                        cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=timeout)


def _assert_one_line_error(result, code=2):
  lines = result.stderr.strip().splitlines()
  assert result.returncode == code, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith("error: "), lines
  return lines[0]


@pytest.fixture(scope="module")
def not_a_dir(tmp_path_factory):
  """A workdir under a regular file: unwritable even for root."""
  path = tmp_path_factory.mktemp("cli") / "a_file"
  path.write_text("")
  return str(path / "workdir")


CASES = [
    # (extra args, a word the message must hold)
    (["--config.nope=1"], "unknown config key 'nope'"),
    (["--config.train.nope=1"], "unknown config key 'train.nope'"),
    (["--config.train.global_batchh=1"], "unknown config key "
     "'train.global_batchh' (did you mean 'train.global_batch'?); every"),
    (["--config.protocol.base=10", "--config.protocol.increment=3"],
     "B10-C3 does not fit 20 classes"),
    (["--config.train.global_batch=12"], "not divisible by the 8 devices"),
    (["--config.method=nope"], "unknown method 'nope'"),
    (["--config.train.global_batch=abc"], "--config.train.global_batch"),
    (["--config.seed=-1"], "seed must be an integer in [0, 2**32-1]"),
    (["--config.seed=18446744073709551616"], "2**32-1] (jax.random.key"),
    (["--config.data.synthetic.seed=-1"], "data.synthetic.seed must be"),
    (["--config.loss.temperature=inf"], "loss.temperature must be a finite "
     "number > 0.0, got inf"),
    (["--config.loss.lambda_kd=inf"], "loss.lambda_kd must be a finite"),
    (["--config.data.source=voc2007"], "data_dir"),
    (["--config.data.synthetic.num_train=2"], "has no training images"),
    (["stray"], "unexpected argument"),
    (["--config.data.source=voc2007", "--config.data.data_dir=README.md"],
     "config.data.data_dir README.md is not a directory"),
    (["--config.model.dtype=float16"], "model.dtype=float16 is not offered: "
     "it needs loss scaling"),
    (["--config.optim.momentum=0.5"], "nothing reads optim.momentum in this "
     "config (optim.momentum: it is SGD's; optim.name 'adam' has none"),
]


@pytest.mark.parametrize("extra,expected", CASES,
                         ids=[c[1].split()[0] + str(i)
                              for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2(tmp_path, extra, expected):
  result = _cli("--config=configs/test.py", f"--workdir={tmp_path}", *extra)
  line = _assert_one_line_error(result)
  assert expected in line


def test_unwritable_workdir(not_a_dir):
  line = _assert_one_line_error(_cli("--config=configs/test.py",
                                     f"--workdir={not_a_dir}"))
  assert "not writable" in line and "--workdir" in line


@pytest.mark.parametrize("args,expected", [
    (["--config=configs/synthetic.py:b9c9"], "unknown setting 'b9c9'"),
    (["--config=configs/nofile.py"], "not found"),
    (["--config="], "names no file"),
    (["--config=:b10c2"], "names no file"),
    (["--config=configs/test.py"], "--workdir is required"),
    ([], "--config is required"),
    (["--config=configs/test.py", "--bogus=1"], "Unknown command line flag"),
])
def test_missing_or_bad_flags(tmp_path, args, expected):
  if not any(a.startswith("--workdir") for a in args) and args != [
      "--config=configs/test.py"]:
    args = args + [f"--workdir={tmp_path}"]
  line = _assert_one_line_error(_cli(*args))
  assert expected in line


# absl knows --help, -?, --helpshort and --helpfull; -h used to be "Unknown
# command line flag 'h'", exit 2.
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(flag):
  result = _cli(flag)
  assert result.returncode == 0
  assert "--config" in result.stdout and "--workdir" in result.stdout


@pytest.mark.parametrize("flag,expected", [
    # absl's boolean error has two args: shown joined, not as a tuple.
    ("--config.resume=maybe", "bad value in --config.resume=maybe: "
     "Non-boolean argument to boolean flag: maybe"),
    # The upstream block is not in config_base.py: the line says where.
    ("--config.upstream.lr=0.1", "unknown config key 'upstream.lr'; the "
     "upstream.* block exists in the pretrained_* settings"),
])
def test_override_messages_say_what_to_do(flag, expected):
  with pytest.raises(UserError) as error:
    main.build_config([f"--config={ROOT}/configs/synthetic.py", flag])
  assert str(error.value) == expected or str(error.value).startswith(
      expected)


def test_a_workdir_that_is_a_file_is_named_so(tmp_path):
  path = tmp_path / "afile"
  path.write_text("")
  with pytest.raises(UserError, match="is a file, not a directory"):
    validate.check_workdir(str(path))


def test_init_from_a_file_of_unknown_type(tmp_path):
  from rebll_jax.models import pretrained  # pylint: disable=g-import-not-at-top
  path = tmp_path / "weights"
  path.write_text("")
  # Before: "is a PyTorch file, and model.arch 'small_resnet' has no
  # PyTorch counterpart", though nothing said it was one.
  for arch in ("small_resnet", "resnet18"):
    with pytest.raises(UserError, match="is a file of unknown type"):
      pretrained.check_init_from_file(str(path), arch)
  with pytest.raises(UserError, match="has no PyTorch counterpart"):
    pretrained.check_init_from_file(str(tmp_path / "w.pth"), "small_resnet")


def test_non_finite_loss_exits_1_without_traceback(tmp_path):
  result = _cli("--config=configs/test.py", f"--workdir={tmp_path}",
                "--config.protocol.num_tasks=1", "--config.debug.nan_at_step=0",
                "--config.train.log_every=1", timeout=300)
  line = _assert_one_line_error(result, code=1)
  assert "non-finite loss at task 1, step 1 " in line


# --- in process: the workdir, empty tasks --------------------------------


def _config(**overrides):
  return make_config(**overrides)


def test_full_disk_is_detected_before_training(tmp_path, monkeypatch):
  usage = shutil.disk_usage(str(tmp_path))
  monkeypatch.setattr(validate.shutil, "disk_usage",
                      lambda path: usage._replace(free=1 << 20))
  monkeypatch.setattr(train.steps, "make_train_step", None)  # never reached
  with pytest.raises(UserError, match="MiB free but the run needs"):
    train.run(_config(), str(tmp_path))


def test_workdir_that_cannot_take_a_write(tmp_path, monkeypatch):
  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(validate.os, "fsync", full)
  with pytest.raises(UserError, match="No space left on device"):
    validate.check_workdir(str(tmp_path / "w"))


def test_pytorch_file_for_an_arch_without_a_pytorch_twin(tmp_path):
  # Was "unknown arch 'small_resnet'; valid: [...]" from the converter, after
  # the model's init: as if the arch itself were unknown.
  weights = tmp_path / "resnet18.pth"
  weights.write_bytes(b"not read")
  line = _assert_one_line_error(_cli(
      "--config=configs/test.py", f"--workdir={tmp_path / 'w'}",
      f"--config.model.init_from={weights}"))
  assert "is a PyTorch file, and model.arch 'small_resnet' has no PyTorch" \
      in line and "upstream:auto" in line


def test_task_without_images_is_named():
  labels = np.zeros((6, 4), np.uint8)
  labels[:, :2] = 1  # classes 2 and 3 never occur
  split = Split(labels=labels, image_ids=np.arange(6),
                read_images=lambda i: np.zeros((len(i), 8, 8, 3), np.uint8))
  source = Source(name="toy", class_names=["a", "b", "c", "d"], train=split,
                  test=split)
  tasks = protocol.make_tasks(4, 2, 2)
  with pytest.raises(UserError, match=r"task 2 has no training images "
                     r"\(classes \['c', 'd'\]\)"):
    validate.check_tasks(source, tasks, make_config().protocol)


def test_a_task_without_test_images_is_refused_before_training():
  # Task 1's classes (a, b) never occur in the test split: the run used to
  # train task 1, then stop with an IndexError traceback when scoring it,
  # and every rerun trained it again.
  train_labels = np.eye(4, dtype=np.uint8).repeat(2, axis=0)
  test_labels = np.zeros((4, 4), np.uint8)
  test_labels[:, 2:] = 1
  def split(labels):
    return Split(labels=labels, image_ids=np.arange(len(labels)),
                 read_images=lambda i: np.zeros((len(i), 8, 8, 3), np.uint8))
  source = Source(name="toy", class_names=["a", "b", "c", "d"],
                  train=split(train_labels), test=split(test_labels))
  with pytest.raises(UserError, match=r"no image of task 1's classes "
                     r"\(\['a', 'b'\]\)"):
    validate.check_tasks(source, protocol.make_tasks(4, 2, 2),
                         make_config().protocol)
  # Scored on all seen classes: once task 1 has test images, so do the rest.
  test_labels[0, 0] = 1
  validate.check_tasks(source, protocol.make_tasks(4, 2, 2),
                       make_config().protocol)


# --- hypothesis over the config surface -----------------------------------

CHOICES = {
    "method": ["rebll", "ft", "er", "joint", "lwf", "nope", ""],
    "data.source": ["synthetic", "voc2007", "nope"],
    "model.arch": ["small_resnet", "resnet18", "nope"],
    "model.dtype": ["float32", "bfloat16", "float8"],
    "optim.name": ["adam", "adamw", "sgd", "nope"],
    "optim.schedule": ["one_cycle", "cosine", "constant", "nope"],
    "memory.selection": ["herding", "random", "nope"],
    "memory.mix": ["uniform", "fraction", "nope"],
}


def _leaves(config, prefix=""):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


LEAVES = dict(_leaves(config_base.base_config()))
NON_FINITE = [float("nan"), float("inf"), float("-inf")]
HUGE_INTS = [2**31, 2**32, 2**63, 2**64, 10**30, -2**63]


def _value_for(key):
  default = LEAVES[key]
  if key in CHOICES:
    return st.sampled_from(CHOICES[key])
  if isinstance(default, bool):
    return st.booleans()
  if isinstance(default, int):
    return st.one_of(st.integers(-3, 40), st.sampled_from(HUGE_INTS),
                     st.sampled_from([0, 1, 8, 16, 64]))
  if isinstance(default, float):
    return st.one_of(st.floats(-2, 2), st.sampled_from(
        [0.0, 0.5, 1.0, -1e-9, 1e30, -1e308, *NON_FINITE]))
  if isinstance(default, tuple):
    return st.lists(st.integers(-1, 3), max_size=4).map(tuple)
  return st.text(max_size=5)


overrides_strategy = st.lists(
    st.sampled_from(sorted(LEAVES)), min_size=1, max_size=4,
    unique=True).flatmap(lambda keys: st.fixed_dictionaries(
        {k: _value_for(k) for k in keys}))


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
@hypothesis.given(overrides=overrides_strategy,
                  num_devices=st.sampled_from([1, 2, 8]))
def test_any_config_is_valid_or_one_user_error(overrides, num_devices):
  config = config_base.base_config()
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  try:
    validate.check_all(config, num_classes=20, num_devices=num_devices)
  except UserError as e:
    assert str(e) and "\n" not in str(e)
    return
  # Accepted: the values the trainer relies on hold.
  assert config.train.global_batch % num_devices == 0
  assert 0 <= config.seed < 2**32 and config.train.log_every > 0
  for key, value in _leaves(config):
    if isinstance(value, float):
      assert math.isfinite(value), key
    elif isinstance(value, int) and not isinstance(value, bool):
      assert -2**31 <= value < 2**32, key
  assert all(np.isfinite(float(config.optim[k]))
             for k in ("lr_first", "lr_later"))
  assert all(config.relabel[f"{k}_low"] <= config.relabel[k]
             for k in ("tau_old", "tau_cur"))


@hypothesis.settings(max_examples=8, deadline=None, derandomize=True)
@hypothesis.given(key=st.sampled_from(sorted(LEAVES)),
                  raw=st.sampled_from(["", "x", "-1", "1e9", "nan", "(1,",
                                       "None", "0"]))
def test_cli_never_tracebacks_on_a_raw_override(key, raw, tmp_path_factory):
  # A workdir under a file: a config the checks accept ends at the workdir
  # check, so nothing trains; every outcome must be one line and exit 2.
  path = tmp_path_factory.mktemp("raw") / "file"
  path.write_text("")
  result = _cli("--config=configs/test.py", f"--workdir={path}/w",
                f"--config.{key}={raw}")
  _assert_one_line_error(result)


def test_unknown_norm_impl_is_a_user_error():
  with pytest.raises(UserError, match="unknown model.norm_impl 'bogus'"):
    validate.check_config(_config(**{"model.norm_impl": "bogus"}))


def test_unknown_conv_impl_is_a_user_error():
  with pytest.raises(UserError, match="unknown model.conv_impl 'foo'"):
    validate.check_config(_config(**{"model.conv_impl": "foo"}))


# --- the numeric rule table ------------------------------------------------


def test_every_numeric_field_has_a_rule():
  numeric = {k: v for k, v in LEAVES.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
  assert sorted(numeric) == sorted(config_checks.RULES), (
      "a numeric field of config_base.py without a rule in "
      "rebll_jax/config_checks.py (or a rule for a field that is gone)")
  for key, value in numeric.items():
    assert config_checks.RULES[key].kind is type(value), key
    config_checks.check_value(key, value)  # every default is accepted


@pytest.mark.parametrize("key,value,ok", [
    ("optim.lr_first", 1e30, True),  # finite: the non-finite guard's job
    ("optim.lr_first", 0.0, False),
    ("optim.lr_later", float("nan"), False),
    ("loss.temperature", float("inf"), False),
    ("loss.temperature", 0.0, False),
    ("loss.temperature", 1e-3, True),
    ("loss.lambda_kd", float("inf"), False),
    ("loss.lambda_kd", 0.0, True),
    ("loss.margin", 1.0, False),
    ("loss.g_neg", -0.5, False),
    ("relabel.tau_old_low", -1.0, True),  # the "same as tau_old" sentinel
    ("relabel.tau_old_low", float("-inf"), False),
    ("relabel.tau_old_low", 1.5, False),
    ("relabel.tau_pseudo", 1.0, False),
    ("memory.fraction", 1.0, False),
    ("seed", 2**32 - 1, True),
    ("seed", 2**32, False),  # jax.random.key would repeat seed 0
    ("data.synthetic.seed", -1, False),
    ("protocol.num_tasks", -1, True),
    ("protocol.num_tasks", 0, False),
    ("train.epochs_first", 0, False),
    ("train.global_batch", 2**40, False),
    ("model.stem_stride", 3, False),
    ("train.global_batch", True, False),  # a bool is not a count
    ("train.global_batch", 8.0, False),
])
def test_rule_examples(key, value, ok):
  if ok:
    config_checks.check_value(key, value)
  else:
    with pytest.raises(UserError, match=rf"^{re.escape(key)} must be .*, got "):
      config_checks.check_value(key, value)


def test_missing_and_unknown_fields_are_refused():
  config = make_config()
  config.unlock()
  config.optim.lr = 0.1  # a typo: would be ignored silently
  with pytest.raises(UserError, match="'optim.lr' is not in"):
    config_checks.check_values(config)
  with pytest.raises(UserError, match="lacks 1 field.*'seed'"):
    config = make_config()
    config.unlock()
    del config["seed"]
    config_checks.check_values(config)


# --- config files that misbehave -------------------------------------------

ENDINGS = {
    "raises NameError": "return undefined_name",
    "raises RuntimeError": "raise RuntimeError('boom')",
    "returns a dict": "return {'seed': 0}",
    "returns None": "return None",
    "returns an int": "return 5",
    "recurses": "return get_config()",
    "returns a partial ConfigDict": "return ml_collections.ConfigDict("
                                    "{'seed': 1})",
    "returns the base config": "return config_base.base_config()",
}


def _config_file(directory, ending, assign=None, header=""):
  lines = ["import ml_collections", "from rebll_jax import config_base",
           header, "def get_config():"]
  if assign is not None:
    key, value = assign
    literal = (f"float({str(value)!r})" if isinstance(value, float) and
               not math.isfinite(value) else repr(value))
    lines += ["  c = config_base.base_config()", f"  c.{key} = {literal}",
              "  return c"]
  else:
    lines.append(f"  {ending}")
  path = os.path.join(directory, "cfg.py")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def _load_in_process(path):
  """The CLI's own --config loader, then the CLI's first check."""
  try:
    config = main.FLAGS["config"].parser.parse(path)
    config_checks.check_values(config)
    return "accepted"
  except (main._ConfigFileError, UserError) as e:  # pylint: disable=protected-access
    assert "\n" not in str(e) and str(e), str(e)
    return "refused"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ml_collections
@hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
@hypothesis.given(
    ending=st.sampled_from(sorted(ENDINGS)),
    assign=st.one_of(st.none(), st.tuples(
        st.sampled_from(sorted(config_checks.RULES)),
        st.sampled_from([*NON_FINITE, *HUGE_INTS, -1, 0, 0.5, "x", None]))),
    header=st.sampled_from(["", "import not_a_module", "x = (", "1 / 0"]))
def test_any_config_file_loads_or_is_one_line(ending, assign, header,
                                              tmp_path_factory):
  path = _config_file(str(tmp_path_factory.mktemp("cfg")), ENDINGS[ending],
                      assign, header)
  outcome = _load_in_process(path)
  if header:  # a file that does not import, compile or run
    assert outcome == "refused"
  elif assign is None:
    assert outcome == ("accepted" if ending == "returns the base config"
                       else "refused")
  else:  # the base config with one field set in the file
    key, value = assign
    rule = config_checks.RULES[key]
    valid = (config_checks.is_number(value) and
             (rule.kind is float or isinstance(value, int)) and
             math.isfinite(value) and rule.holds(value))
    assert outcome == ("accepted" if valid else "refused"), assign


@pytest.mark.parametrize("ending,expected", [
    ("raises NameError", "NameError: name 'undefined_name' is not defined"),
    ("returns a dict", "get_config() returned a dict, not an "
     "ml_collections.ConfigDict"),
    ("returns None", "get_config() returned None"),
    ("returns a partial ConfigDict", "the config lacks"),
])
def test_misbehaving_config_file_is_one_line(tmp_path, ending, expected):
  path = _config_file(str(tmp_path), ENDINGS[ending])
  line = _assert_one_line_error(_cli(f"--config={path}",
                                     f"--workdir={tmp_path}/w"))
  assert expected in line


def test_config_file_without_get_config(tmp_path):
  path = tmp_path / "cfg.py"
  path.write_text("x = 1\n")
  line = _assert_one_line_error(_cli(f"--config={path}",
                                     f"--workdir={tmp_path}/w"))
  assert line == f"error: config file {str(path)!r} defines no get_config() " \
      "function"


def test_integer_parse_error_keeps_its_quotes(tmp_path):
  line = _assert_one_line_error(_cli("--config=configs/test.py",
                                     f"--workdir={tmp_path}",
                                     "--config.train.global_batch=abc"))
  assert line.endswith("invalid literal for int() with base 10: 'abc'")


def test_unknown_key_message_names_the_whole_path_and_the_suggestion():
  # What str() of ml_collections' KeyError looks like for a close typo.
  text = str(KeyError("'trian'\nDid you mean \"train\" instead of "
                      "\"trian\"?"))
  message = main._unknown_key_message(  # pylint: disable=protected-access
      text, ["main", "--config.trian.global_batch=3"])
  assert message.startswith("unknown config key 'trian.global_batch' (did "
                            "you mean 'train.global_batch'?); every"), message
  assert "\\" not in message and "\n" not in message


_INTERRUPTED_RUN = """
import json, sys
from rebll_jax import main, train

def run(config, workdir, setting=None):  # what main hands over, then Ctrl-C
  print(json.dumps([workdir, config.data.data_dir, config.model.init_from]))
  raise KeyboardInterrupt

train.run = run
sys.argv = ["main", "--config=configs/test.py", "--workdir=~/wd",
            "--config.data.data_dir=~/data", "--config.model.init_from=~/w"]
main.run()
"""


def test_home_is_expanded_and_ctrl_c_is_one_line_exit_130(tmp_path):
  script = tmp_path / "run.py"
  script.write_text(_INTERRUPTED_RUN)
  home = tmp_path / "home"
  result = subprocess.run([sys.executable, str(script)], cwd=ROOT,
                          env={**_env(), "HOME": str(home)},
                          capture_output=True, text=True, timeout=120)
  # The shell leaves ~ alone inside --config.a.b=~/x: expanded here.
  assert json.loads(result.stdout.splitlines()[-1]) == [
      str(home / "wd"), str(home / "data"), str(home / "w")]
  assert result.returncode == 130, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.stderr.strip().startswith("interrupted; the checkpoints in "
                                          f"{home / 'wd'} are kept")
