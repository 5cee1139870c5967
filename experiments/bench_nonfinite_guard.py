"""Cost of the trainer's non-finite guard on the default synthetic step.

  python experiments/bench_nonfinite_guard.py [--iters 30] [--cpu_devices N]

Times, interleaved in one process, the jitted train step of
``configs/synthetic.py`` (rebll, past model present) as the trainer ran it
before the guard watched more than the loss (loss check only) and as it runs
now (``train.compile_steps``: loss, gradient norm and every updated
parameter / batch statistic). Prints median ms/step of both and the ratio.

Both programs compile as a run's step does: the run's XLA compiler options
(``xla_cpu.options_for(config.model)``: library fusions, scheduler), the
state donated, and the CPU split into the config's ``cpu_devices`` (2 for
the default experiment; ``--cpu_devices`` overrides it, 0 = one device)
before JAX starts, so the ratio isolates the guard.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# No JAX here: the CPU is split (cpu_devices) before JAX is imported.
from configs import synthetic  # noqa: E402
from experiments.cli_checks import non_negative_int, positive_int  # noqa: E402
from rebll_jax import xla_cpu  # noqa: E402


def jit_like_the_run(fun, mesh, model_config):
  """``jax.jit`` of a step as ``train.compile_steps`` jits a run's: the
  state donated, replicated outputs, the run's XLA compiler options."""
  import jax  # pylint: disable=g-import-not-at-top
  from rebll_jax import parallel  # pylint: disable=g-import-not-at-top
  rep = parallel.replicated(mesh)
  return jax.jit(fun, donate_argnums=0, out_shardings=(rep, rep, rep),
                 compiler_options=xla_cpu.options_for(model_config))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--iters", type=positive_int, default=30,
                      help="timed steps of each program")
  parser.add_argument("--cpu_devices", type=non_negative_int, default=None,
                      help="XLA CPU devices (default: the config's "
                           "cpu_devices, as a run; 0: one device)")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  config = synthetic.get_config()
  config.train.progress = False
  if args.cpu_devices is not None:
    config.cpu_devices = args.cpu_devices
  split = xla_cpu.split_host_cpu(config.cpu_devices)
  if split:
    print(split, file=sys.stderr)
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np
  from rebll_jax import parallel, steps, train
  # pylint: enable=g-import-not-at-top
  workdir = "/tmp/bench_nonfinite_guard"
  setup = train.set_up(config, workdir)
  try:
    state = train._initial_state(setup)  # pylint: disable=protected-access
    mesh, task = setup.mesh, setup.tasks[1]
    options = xla_cpu.options_for(config.model)
    print(f"devices: {mesh.size} ({jax.default_backend()}); compiler "
          f"options of both programs: {options}", flush=True)
    view = train._task_view(setup, task)  # pylint: disable=protected-access
    batches = train._task_batches(setup, state, task, view)  # pylint: disable=protected-access
    host = batches.batch(0)
    truth = parallel.to_global(mesh, host.pop("true_labels"))
    batch = parallel.to_global(mesh, host)
    context = parallel.replicate(mesh, steps.task_context(
        task, task_start=0, total_steps=100, lr_peak=1e-3))
    fn = steps.make_train_step(model=setup.model, method=setup.method,
                               config=config, tx=setup.tx, has_old=True)

    def loss_only(s, old, b, c, k, t, bad):
      new, out = fn(s, old, b, c, k, t)
      flag = ~jnp.isfinite(out["loss"]) & (bad < 0)
      return new, out, jnp.where(flag, s.step, bad)

    # Compiled as train.compile_steps compiles `now`: same options, same
    # donation, same output shardings; only the watch differs.
    before = jit_like_the_run(loss_only, mesh, config.model)
    now = train.compile_steps(setup).later
    train_state = parallel.replicate(mesh, state.train)
    old = parallel.replicate(mesh, state.old)
    args_common = (old, batch, context, setup.root_key, truth)
    bad0 = parallel.replicate(mesh, np.asarray(-1, np.int32))
    watch0 = parallel.replicate(mesh, np.asarray([-1, 0], np.int32))
    times = {"loss only": [], "loss, gradient, state": []}
    pair = (("loss only", before, bad0), ("loss, gradient, state", now,
                                          watch0))
    for i in range(args.iters + 2):
      for name, f, w in pair if i % 2 == 0 else pair[::-1]:  # no order bias
        s = jax.tree.map(jnp.copy, train_state)  # both donate their state
        jax.block_until_ready(s)
        t0 = time.perf_counter()
        jax.block_until_ready(f(s, *args_common, w))
        if i >= 2:  # the first two calls compile
          times[name].append(1e3 * (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
      q = statistics.quantiles(times[k], n=4) if len(times[k]) > 1 else [v, v, v]
      print(f"{k:>24}: {v:7.1f} ms/step (median of {args.iters}; "
            f"quartiles {q[0]:.1f}-{q[2]:.1f})")
    ratios = sorted(n / b for n, b in zip(times["loss, gradient, state"],
                                          times["loss only"]))
    print(f"ratio now/before: {med['loss, gradient, state'] / med['loss only']:.3f}"
          f" (of medians; round by round: median "
          f"{statistics.median(ratios):.3f}, range {ratios[0]:.3f}-"
          f"{ratios[-1]:.3f})")
  finally:
    if setup.lock is not None:
      setup.lock.release()


if __name__ == "__main__":
  main()
