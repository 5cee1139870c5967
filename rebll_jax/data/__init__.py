"""Data-source registry: ``build_source(config.data) -> Source``."""

from __future__ import annotations

from typing import Callable

from rebll_jax.data import synthetic
from rebll_jax.data.base import Source, Split  # noqa: F401

# name -> builder(data_config) -> Source
SOURCES: dict[str, Callable[..., Source]] = {
    "synthetic": synthetic.build,
}


def build_source(cfg) -> Source:
  if cfg.source not in SOURCES:
    raise ValueError(
        f"unknown data.source {cfg.source!r}; valid: {sorted(SOURCES)}")
  return SOURCES[cfg.source](cfg)
