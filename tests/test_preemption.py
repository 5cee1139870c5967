"""SIGTERM as a stop request (rebll_jax/preemption.py), in process.

The whole path (a run that saves on SIGTERM, exits 143 and resumes to the
uninterrupted result) is ``tests/test_resume.py``.
"""

import os
import signal

import pytest

from rebll_jax import preemption


@pytest.fixture
def default_sigterm():
  previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
  yield
  signal.signal(signal.SIGTERM, previous)


def test_sigterm_becomes_a_request_and_the_default_comes_back(default_sigterm):
  with preemption.StopOnSigterm() as stop:
    assert not stop.requested and not stop.due(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested and stop.due(2)
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_handler_of_the_embedding_program_is_left_in_charge(default_sigterm):
  seen = []
  mine = lambda signum, frame: seen.append(signum)  # noqa: E731
  signal.signal(signal.SIGTERM, mine)
  with preemption.StopOnSigterm() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert seen == [signal.SIGTERM] and not stop.due(1)
  assert signal.getsignal(signal.SIGTERM) is mine
