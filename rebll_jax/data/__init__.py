"""Data-source registry: ``build_source(config.data) -> Source``."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from rebll_jax.data import prepared, synthetic
from rebll_jax.data.base import Source, Split
from rebll_jax.errors import UserError

# name -> builder(data_config) -> Source
SOURCES: dict[str, Callable[..., Source]] = {
    "synthetic": synthetic.build,
    "voc2007": lambda cfg: prepared.build_prepared(cfg, "voc2007"),
    "coco2014": lambda cfg: prepared.build_prepared(cfg, "coco2014"),
    "coco_format": lambda cfg: prepared.build_prepared(cfg, "coco_format"),
    "tfds_voc2007": prepared.build_tfds_voc2007,
}


def _subset(split: Split, rows: np.ndarray) -> Split:
  return split.take(rows)


def carve_validation(source: Source, fraction: float, seed: int) -> Source:
  """Holds out ``fraction`` of train as the evaluation split (for tuning).

  The real test split is dropped, so hyperparameters chosen on this source
  never see it.
  """
  rng = np.random.default_rng([seed, 99])
  order = rng.permutation(len(source.train))
  num_val = int(round(fraction * len(order)))
  if num_val == 0 or num_val == len(order):
    raise UserError(f"data.val_fraction={fraction} leaves an empty split")
  val, train = np.sort(order[:num_val]), np.sort(order[num_val:])
  return dataclasses.replace(
      source, train=_subset(source.train, train),
      test=_subset(source.train, val),
      info={**source.info, "evaluated_on": "validation carved from train"})


def build_source(cfg) -> Source:
  if cfg.source not in SOURCES:
    raise UserError(
        f"unknown data.source {cfg.source!r}; valid: {sorted(SOURCES)}")
  source = SOURCES[cfg.source](cfg)
  val_fraction = cfg.get("val_fraction", 0.0)  # absent in partial configs
  if val_fraction > 0:
    source = carve_validation(source, val_fraction, seed=0)
  return source
