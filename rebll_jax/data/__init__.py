"""Data-source registry: ``build_source(config.data) -> Source``."""

from __future__ import annotations

from typing import Callable

from rebll_jax.data import prepared, synthetic
from rebll_jax.data.base import Source, Split  # noqa: F401

# name -> builder(data_config) -> Source
SOURCES: dict[str, Callable[..., Source]] = {
    "synthetic": synthetic.build,
    "voc2007": lambda cfg: prepared.build_prepared(cfg, "voc2007"),
    "coco2014": lambda cfg: prepared.build_prepared(cfg, "coco2014"),
    "coco_format": lambda cfg: prepared.build_prepared(cfg, "coco_format"),
    "tfds_voc2007": prepared.build_tfds_voc2007,
}


def build_source(cfg) -> Source:
  if cfg.source not in SOURCES:
    raise ValueError(
        f"unknown data.source {cfg.source!r}; valid: {sorted(SOURCES)}")
  return SOURCES[cfg.source](cfg)
