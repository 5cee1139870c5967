"""Argument checks shared by the experiment scripts.

A user's mistake on the command line is a one-line usage error (exit 2),
never a traceback from deep inside a run.
"""

from __future__ import annotations

import argparse
import sys


def _int_at_least(text: str, low: int) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
  if value < low:
    raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
  return value


def positive_int(text: str) -> int:
  """argparse ``type=`` for counts and sizes that must be >= 1."""
  return _int_at_least(text, 1)


def parse_seeds(parser: argparse.ArgumentParser, text: str) -> list[int]:
  """``"0,1,2"`` -> [0, 1, 2]; parser.error for anything else (jax keeps 32
  bits of a seed)."""
  try:
    seeds = [int(s) for s in text.split(",")]
  except ValueError:
    parser.error(f"--seeds must be comma-separated integers, got {text!r}")
  if any(not 0 <= s < 2**32 for s in seeds):
    parser.error(f"--seeds must be in [0, 2**32-1], got {text!r}")
  refuse_repeats(parser, "--seeds", seeds)
  return seeds


def refuse_repeats(parser: argparse.ArgumentParser, flag: str, values):
  """parser.error when a list option names a value twice: the run would
  count it twice (a seed in a mean ± std) or print its row twice."""
  twice = sorted({str(v) for v in values if list(values).count(v) > 1})
  if twice:
    parser.error(f"{flag} names {', '.join(twice)} more than once; give "
                 "each once")


def non_negative_int(text: str) -> int:
  """argparse ``type=`` for counts that may be 0 (0 usually: "off" or "the
  default")."""
  return _int_at_least(text, 0)


def positive_float(text: str) -> float:
  """argparse ``type=`` for a finite number that must be > 0 (a time, a
  rate: 0 would divide by zero, a negative one prints nonsense)."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
  if not 0 < value < float("inf"):
    raise argparse.ArgumentTypeError(f"must be a finite number > 0, got "
                                     f"{text}")
  return value


def parse_positive_ints(parser: argparse.ArgumentParser, flag: str,
                        text: str) -> list[int]:
  """``"64,224"`` -> [64, 224]; parser.error for an entry that is not an
  integer >= 1, an empty list, or a value named twice."""
  items = [t.strip() for t in text.split(",") if t.strip()]
  if not items:
    parser.error(f"{flag} {text!r} names no value; give comma-separated "
                 "integers >= 1")
  try:
    values = [positive_int(t) for t in items]
  except argparse.ArgumentTypeError as e:
    parser.error(f"{flag} {text!r}: {e}")
  refuse_repeats(parser, flag, values)
  return values


def usage_error(message: str):
  """One line on stderr and exit 2: a user's mistake found after
  ``parse_args`` (one line, not argparse's usage and error)."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)
