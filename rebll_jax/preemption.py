"""SIGTERM stops a run at the next step boundary, with a checkpoint.

Schedulers (SLURM, Kubernetes, preemptible cloud VMs) send SIGTERM some
seconds before they kill a job. Python's default is to die at once, losing
every step since the last checkpoint (up to ``train.checkpoint_every``, or a
whole task with 0). ``StopOnSigterm`` turns the signal into a request that
the train loop reads after each step: the loop saves a checkpoint there and
raises ``Preempted``; the CLI prints one line and exits with 143 (128 +
SIGTERM, what a shell reports for a terminated job, so a scheduler or a
retry loop sees a run that did not finish). The same command resumes.

One process: a Python signal handler sets a flag. Several processes: the
save is collective, so every process must stop at the same step; JAX's
preemption sync point (``multihost_utils.reached_preemption_sync_point``,
driven by the coordination service, which catches SIGTERM itself) names
that step, and no Python handler is installed.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):
  """The run stopped on SIGTERM after saving a checkpoint."""


class StopOnSigterm:
  """Context manager: while inside, SIGTERM requests a stop.

  ``due(global_step)`` after each train step (every process, every step)
  says whether to save and stop there; ``requested`` says whether a stop
  was asked for at all (between tasks, one process). Outside a main thread,
  or in a process whose SIGTERM handler is not Python's default, nothing is
  installed and ``due`` is always False (the caller's handler stays in
  charge).
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._installed = False
    self._multi = jax.process_count() > 1

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __enter__(self):
    if self._multi or threading.current_thread() is not threading.main_thread():
      return self
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
      return self  # the embedding program handles SIGTERM its own way
    self._previous = previous
    signal.signal(signal.SIGTERM, self._handle)
    self._installed = True
    return self

  def __exit__(self, *exc):
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False
    return False

  def due(self, global_step: int) -> bool:
    if self._multi:
      try:
        return multihost_utils.reached_preemption_sync_point(global_step)
      except RuntimeError:  # the preemption service is turned off
        return False
    return self.requested
