"""Cost of the trainer's non-finite guard on the default synthetic step.

  python experiments/bench_nonfinite_guard.py [--iters 30]

Times, interleaved in one process, the jitted train step of
``configs/synthetic.py`` (rebll, past model present) as the trainer ran it
before the guard watched more than the loss (loss check only) and as it runs
now (``train.compile_steps``: loss, gradient norm and every updated
parameter / batch statistic). Prints median ms/step of both and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import synthetic  # noqa: E402
from rebll_jax import parallel, steps, train  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--iters", type=int, default=30)
  args = parser.parse_args()
  config = synthetic.get_config()
  config.train.progress = False
  workdir = "/tmp/bench_nonfinite_guard"
  setup = train.set_up(config, workdir)
  try:
    state = train._initial_state(setup)  # pylint: disable=protected-access
    mesh, task = setup.mesh, setup.tasks[1]
    view = train._task_view(setup, task)  # pylint: disable=protected-access
    batches = train._task_batches(setup, state, task, view)  # pylint: disable=protected-access
    host = batches.batch(0)
    truth = parallel.to_global(mesh, host.pop("true_labels"))
    batch = parallel.to_global(mesh, host)
    context = parallel.replicate(mesh, steps.task_context(
        task, task_start=0, total_steps=100, lr_peak=1e-3))
    rep = parallel.replicated(mesh)
    fn = steps.make_train_step(model=setup.model, method=setup.method,
                               config=config, tx=setup.tx, has_old=True)

    def loss_only(s, old, b, c, k, t, bad):
      new, out = fn(s, old, b, c, k, t)
      flag = ~jnp.isfinite(out["loss"]) & (bad < 0)
      return new, out, jnp.where(flag, s.step, bad)

    before = jax.jit(loss_only, out_shardings=(rep, rep, rep))
    now = train.compile_steps(setup).later
    train_state = parallel.replicate(mesh, state.train)
    old = parallel.replicate(mesh, state.old)
    args_common = (old, batch, context, setup.root_key, truth)
    bad0 = parallel.replicate(mesh, np.asarray(-1, np.int32))
    watch0 = parallel.replicate(mesh, np.asarray([-1, 0], np.int32))
    times = {"loss only": [], "loss, gradient, state": []}
    for i in range(args.iters + 2):
      for name, f, w in (("loss only", before, bad0),
                         ("loss, gradient, state", now, watch0)):
        s = jax.tree.map(jnp.copy, train_state)  # `now` donates its state
        jax.block_until_ready(s)
        t0 = time.perf_counter()
        jax.block_until_ready(f(s, *args_common, w))
        if i >= 2:  # the first two calls compile
          times[name].append(1e3 * (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
      print(f"{k:>24}: {v:7.1f} ms/step (median of {args.iters})")
    print(f"ratio now/before: {med['loss, gradient, state'] / med['loss only']:.3f}")
  finally:
    if setup.lock is not None:
      setup.lock.release()


if __name__ == "__main__":
  main()
