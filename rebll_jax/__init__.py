"""rebll_jax: RebLL multi-label class-incremental learning in JAX/Flax."""

__version__ = "0.1.0"
