"""The experiment tables' child runs: started, tracked, stopped with the table.

method_table.py, field_rows.py and akd_readings.py run
``python -m rebll_jax.main`` in subprocesses, several at once from a thread
pool. Ctrl-C or SIGTERM to the table stops its runs the way it stops one
run: each child gets the same signal (SIGINT: it exits at once; SIGTERM: it
saves a checkpoint at the next step), the runs not started yet are dropped,
and the table waits for the children to end, then prints one line and
exits 130 / 143 (``rebll_jax.preemption.call_stoppable``). The checkpoints
are kept: the same command resumes.

The children run in a session of their own, so that a terminal's Ctrl-C
reaches them once, through the table, and never behind its back.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import signal
import subprocess
import sys
import threading

from rebll_jax import preemption

# What Ctrl-C and SIGTERM raise in the table's main thread (SIGTERM inside
# call_stoppable), and the signal each one forwards to the children.
_FORWARDED = {KeyboardInterrupt: signal.SIGINT,
              preemption.Terminated: signal.SIGTERM}
_INTERRUPTS = tuple(_FORWARDED)
AFTER_STOP = ("the runs started stopped with their checkpoints kept; rerun "
              "the same command to resume")

_lock = threading.Lock()
_live: set = set()  # Popen of the children running now
_stopping = threading.Event()  # set: no new child starts


class Stopped(RuntimeError):
  """The table is stopping: this run was not started."""


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
  """``subprocess.run(cmd, capture_output=True, text=True, **kwargs)``,
  tracked so that ``stop`` reaches it; ``Stopped`` once the table stops."""
  with _lock:  # a stop either sees this child or keeps it from starting
    if _stopping.is_set():
      raise Stopped("not started: the table is stopping")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    _live.add(proc)
  try:
    out, err = proc.communicate()
  finally:
    with _lock:
      _live.discard(proc)
  return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def stop(interrupt: BaseException):
  """No child starts from now on; each live one gets the signal that
  ``interrupt`` stands for (SIGINT for Ctrl-C, SIGTERM for SIGTERM)."""
  signum = next(s for kind, s in _FORWARDED.items()
                if isinstance(interrupt, kind))
  with _lock:
    _stopping.set()
    for proc in _live:
      with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signum)


def _join(executor):
  """Waits for the pool's threads (so for their children). An interrupt
  meanwhile is forwarded too, and raised once they have ended."""
  interrupted = None
  while True:
    try:
      executor.shutdown(wait=True)
      break
    except _INTERRUPTS as e:
      stop(e)
      interrupted = interrupted or e
  if interrupted is not None:
    raise interrupted


@contextlib.contextmanager
def pool(workers: int):
  """A ThreadPoolExecutor for the runs of one table. Ctrl-C or SIGTERM in
  the body: the runs not started are dropped and the started ones get the
  signal; any other error (a failed run): the runs not started are dropped
  and the started ones finish. Either way it returns (re-raising) only once
  every child has ended."""
  _stopping.clear()
  executor = concurrent.futures.ThreadPoolExecutor(workers)
  try:
    yield executor
  except BaseException as e:
    executor.shutdown(wait=False, cancel_futures=True)
    if isinstance(e, _INTERRUPTS):
      stop(e)
    raise
  finally:
    _join(executor)


def call(fn):
  """``fn()`` with Ctrl-C and SIGTERM stopping the table: one line on
  stderr and exit 130 / 143, after its children have ended."""
  result, code = preemption.call_stoppable(fn, after=AFTER_STOP)
  if code is not None:
    sys.stdout.flush()
    sys.exit(code)
  return result
