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

Outside the train loop (``prepare``, the upstream pretraining CLI: both through
``call_stoppable``), ``sigterm_raises`` turns SIGTERM into
a ``Terminated`` exception instead, so that cleanup in ``finally`` blocks
runs. Both install a handler only where nobody else handles SIGTERM (one
rule, ``_install``). JAX is imported on use: ``prepare`` runs without it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading


class Preempted(Exception):
  """The run stopped on SIGTERM after saving a checkpoint."""


class Terminated(Exception):
  """SIGTERM inside ``sigterm_raises``."""


def _install(handler):
  """Makes ``handler`` the SIGTERM handler; returns the one it replaces,
  or None (nothing installed) outside the main thread or where SIGTERM is
  not Python's default (the embedding program handles it its own way)."""
  if threading.current_thread() is not threading.main_thread():
    return None
  previous = signal.getsignal(signal.SIGTERM)
  if previous is not signal.SIG_DFL:  # a handler of its own, maybe in C
    return None
  signal.signal(signal.SIGTERM, handler)
  return previous


def _raise_terminated(signum, frame):
  del signum, frame
  raise Terminated()


@contextlib.contextmanager
def sigterm_raises():
  """While inside, SIGTERM raises ``Terminated`` in the main thread."""
  previous = _install(_raise_terminated)
  try:
    yield
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def call_stoppable(fn, after: str):
  """``(fn(), None)``, or ``(None, exit code)`` when Ctrl-C or SIGTERM
  stopped it: one line on stderr (``interrupted: AFTER`` or ``stopped by
  SIGTERM: AFTER``) and the shell's code, 130 or 143. For the CLIs outside
  the train loop (prepare, upstream pretraining): SIGTERM raises inside
  ``fn``, so its ``finally`` blocks clean up, instead of Python's default
  (the process ends on the spot)."""
  try:
    with sigterm_raises():
      return fn(), None
  except KeyboardInterrupt:
    print(f"interrupted: {after}", file=sys.stderr)
    return None, 130
  except Terminated:
    print(f"stopped by SIGTERM: {after}", file=sys.stderr)
    return None, 143


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
    self._previous = None  # the handler ours replaced, while installed
    import jax  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    self._multi = jax.process_count() > 1
    self._sync_point = multihost_utils.reached_preemption_sync_point

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __enter__(self):
    if not self._multi:
      self._previous = _install(self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
    return False

  def due(self, global_step: int) -> bool:
    if self._multi:
      try:
        return self._sync_point(global_step)
      except RuntimeError:  # the preemption service is turned off
        return False
    return self.requested
