"""rebll_jax.xla_cpu: the CPU library-fusion choice of every jitted program.

Every choice computes the same train-step gradient (to float32 rounding);
``reductions`` keeps convolutions out of YNNPACK while its reductions stay
there (the mechanism the speed-up rests on, read from the compiled program);
an XLA that does not know the option compiles with its defaults and warns;
an unknown choice is a one-line config error; the predictor compiles with
the run's choice. ``cpu_devices``: the CLI splits the host CPU before JAX
starts, and leaves a user's XLA_FLAGS or an already started JAX alone.
"""

import json
import logging
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rebll_jax import config_base, evaluation, models, parallel, validate
from rebll_jax import xla_cpu
from rebll_jax.errors import UserError
from rebll_jax.models import build_model, resnet, tresnet

from tests.helpers import make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small_model():
  c = config_base.base_config()
  c.model.width, c.model.stage_sizes = 8, (1, 1)
  return build_model(c.model, 5)


def _grad_program(model, variables, x):
  def loss(params):
    out, _ = model.apply({"params": params,
                          "batch_stats": variables["batch_stats"]}, x,
                         train=True, mutable=["batch_stats"])
    return jnp.sum(jnp.tanh(out["logits"]))
  return jax.grad(loss)


def _ynn_bodies(hlo_text: str) -> list[str]:
  """The bodies of the computations that YNNPACK fusions call."""
  called = re.findall(r"fusion\([^\n]*?calls=%?([\w.\-]+)[^\n]*__ynn_fusion",
                      hlo_text)
  bodies = []
  for name in called:
    m = re.search(r"\n%?" + re.escape(name) + r" .*?\{(.*?)\n\}", hlo_text,
                  re.S)
    bodies.append(m.group(1) if m else "")
  return bodies


@pytest.fixture(scope="module")
def net():
  model = _small_model()
  x = jax.random.uniform(jax.random.key(0), (16, 32, 32, 3))
  # Jitted (an op-by-op init took 20 s of the suite), cheap to compile.
  variables = models.init_variables(model, jax.random.key(1), 32)
  return model, variables, x


def test_every_choice_computes_the_same_gradient(net):
  model, variables, x = net
  grads = {}
  for choice in xla_cpu.CPU_LIBRARY_FUSIONS:
    fn = jax.jit(_grad_program(model, variables, x),
                 compiler_options=xla_cpu.compiler_options(choice))
    grads[choice] = jax.tree.leaves(fn(variables["params"]))
  for choice, leaves in grads.items():
    for a, b in zip(leaves, grads["xla_default"]):
      scale = float(np.max(np.abs(b))) + 1e-12
      assert float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) <= (
          1e-4 * scale), choice


def test_reductions_keep_convolutions_out_of_ynnpack(net):
  model, variables, x = net
  options = xla_cpu.compiler_options("reductions")
  if options is None:
    pytest.skip("this XLA does not take the library-fusion option")
  program = jax.jit(_grad_program(model, variables, x),
                    compiler_options=options)
  text = program.lower(variables["params"]).compile().as_text()
  bodies = _ynn_bodies(text)
  assert bodies, "no reduction went to YNNPACK"
  assert all("reduce(" in b for b in bodies)
  assert not any("convolution(" in b for b in bodies)
  assert "convolution(" in text  # the convolutions are XLA's own
  off = jax.jit(_grad_program(model, variables, x),
                compiler_options=xla_cpu.compiler_options("off"))
  assert not _ynn_bodies(off.lower(variables["params"]).compile().as_text())


def test_an_xla_without_the_option_compiles_with_its_defaults(monkeypatch,
                                                              caplog):
  monkeypatch.setattr(xla_cpu, "_OPTION", "xla_cpu_no_such_option_here")
  xla_cpu._supported.cache_clear()  # pylint: disable=protected-access
  try:
    with caplog.at_level(logging.WARNING, logger=xla_cpu.__name__):
      assert xla_cpu.compiler_options("reductions") is None
    assert "compiling with its defaults" in caplog.text
  finally:
    monkeypatch.undo()
    xla_cpu._supported.cache_clear()  # pylint: disable=protected-access


def test_xla_default_and_other_backends_pass_no_options(monkeypatch):
  assert xla_cpu.compiler_options("xla_default") is None
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert xla_cpu.compiler_options("reductions") is None


@pytest.mark.parametrize("family", ["small_resnet", "resnet", "tresnet"])
def test_init_options_give_bit_identical_parameters(family):
  # The cheap-to-compile init program must not change a single bit (small
  # members of each family: the same initialisers as the full nets).
  model = {"small_resnet": _small_model,
           "resnet": lambda: resnet.ResNet(5, stage_sizes=(1, 1, 1, 1)),
           "tresnet": lambda: tresnet.TResNet(5, stage_sizes=(1, 1, 1, 1),
                                              width=16)}[family]()
  assert xla_cpu.init_options() == {"xla_backend_optimization_level": 1}
  key = jax.random.key(3)
  ours = models.init_variables(model, key, 32)  # with init_options
  default = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)),
                                         train=False))(key)
  same = jax.tree.leaves(jax.tree.map(
      lambda a, b: bool(np.array_equal(a, b)), ours, default))
  assert len(same) > 10 and all(same)


def test_init_options_only_on_cpu(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert xla_cpu.init_options() is None


def test_unknown_choice_is_a_user_error():
  with pytest.raises(UserError,
                     match="unknown model.cpu_library_fusion 'fast'"):
    validate.check_config(make_config(**{"model.cpu_library_fusion": "fast"}))


def test_the_predictor_compiles_with_the_runs_choice(monkeypatch):
  seen = []
  real = xla_cpu.options_for
  monkeypatch.setattr(xla_cpu, "options_for",
                      lambda m: seen.append(m.cpu_library_fusion) or real(m))
  config = make_config(**{"model.cpu_library_fusion": "off"})
  evaluation.Predictor(_small_model(), config, parallel.make_mesh(1))
  assert seen == ["off"]


# --- config.model.cpu_scheduler: instruction order, never a value --------

def test_memory_scheduler_is_bit_identical_and_really_asked_for(net):
  model, variables, x = net
  options = xla_cpu.scheduler_options("memory")
  assert options == {"xla_cpu_scheduler_type":
                     "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
  fusion = xla_cpu.compiler_options("reductions") or {}
  grads = {}
  for name, extra in (("memory", options), ("xla_default", {})):
    fn = jax.jit(_grad_program(model, variables, x),
                 compiler_options={**fusion, **extra})
    grads[name] = jax.tree.leaves(fn(variables["params"]))
  assert len(grads["memory"]) > 5
  for a, b in zip(grads["memory"], grads["xla_default"]):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  # A run's options carry both choices; an old config gets XLA's order.
  config = make_config()
  assert xla_cpu.options_for(config.model) == {**fusion, **options}
  with config.unlocked():
    del config.model["cpu_scheduler"]
  assert xla_cpu.options_for(config.model) == (fusion or None)


def test_scheduler_choice_errors_and_other_backends(monkeypatch):
  with pytest.raises(UserError, match="unknown model.cpu_scheduler 'fast'"):
    validate.check_config(make_config(**{"model.cpu_scheduler": "fast"}))
  assert xla_cpu.scheduler_options("xla_default") is None
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert xla_cpu.scheduler_options("memory") is None


# --- config.cpu_devices: the CLI splits the host CPU before JAX starts -----


def _clean_env():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT
  return env


def test_split_host_cpu_sets_the_device_count_before_jax_starts():
  code = ("from rebll_jax import xla_cpu\n"
          "print(xla_cpu.split_host_cpu(3))\n"
          "import jax\n"
          "print(jax.device_count())\n"
          "print(xla_cpu.split_host_cpu(2))\n")
  out = subprocess.run([sys.executable, "-c", code], env=_clean_env(),
                       capture_output=True, text=True, timeout=120,
                       check=True).stdout.splitlines()
  assert out[0] == "host CPU split into 3 XLA devices (cpu_devices)"
  assert out[1] == "3"
  assert "left alone: XLA_FLAGS already sets" in out[2]


def test_split_host_cpu_leaves_a_users_flag_and_a_started_jax_alone(
    monkeypatch):
  assert xla_cpu.split_host_cpu(0) == ""
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=5")
  assert "XLA_FLAGS already sets" in xla_cpu.split_host_cpu(2)
  monkeypatch.setenv("XLA_FLAGS", "")
  assert "JAX was imported" in xla_cpu.split_host_cpu(2)  # it is, here
  assert os.environ["XLA_FLAGS"] == ""


def test_cli_run_on_a_split_cpu(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "rebll_jax.main", "--config=configs/test.py",
       f"--workdir={tmp_path}/w", "--config.cpu_devices=2",
       "--config.protocol.num_tasks=1"],
      cwd=ROOT, env=_clean_env(), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "host CPU split into 2 XLA devices" in result.stderr
  results = json.loads((tmp_path / "w" / "results.json").read_text())
  assert results["devices"]["count"] == 2


def test_a_batch_the_split_cpu_cannot_share_names_cpu_devices():
  config = make_config(**{"cpu_devices": 2, "train.global_batch": 15})
  with pytest.raises(UserError, match=r"the 2 devices \(the CPU split by "
                     r"cpu_devices=2; --config.cpu_devices=0 keeps one "
                     r"device\); use a multiple of 2"):
    validate.check_devices(config, num_devices=2, num_processes=1)
  config = make_config(**{"train.global_batch": 15})
  with pytest.raises(UserError, match=r"the 2 devices; use a multiple"):
    validate.check_devices(config, num_devices=2, num_processes=1)
