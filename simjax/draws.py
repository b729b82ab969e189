"""Random draws of any shape, made as one flat draw and reshaped.

The bits are jax.random's own for the shape (threefry counts positions in row-major order, partitionable
or not; tests/test_draws.py checks it), so nothing a run draws changes. What changes is the program:
a draw over a 4-D shape builds its counters from one iota per axis, and XLA:CPU compiles that into
one large kernel per draw (5.5 s for a [64, 8, 8, 16] dropout mask, 0.35 s drawn flat). Every
dropout mask and noise tensor inside a compiled step goes through here.
"""
import math

import jax
import jax.numpy as jnp


def _flat(shape) -> tuple:
  return (math.prod(shape),)


def normal(key, shape, dtype=jnp.float32):
  """jax.random.normal(key, shape, dtype), drawn flat."""
  shape = tuple(shape)
  return jax.random.normal(key, _flat(shape), dtype).reshape(shape)


def uniform(key, shape, dtype=jnp.float32, minval=0.0, maxval=1.0):
  """jax.random.uniform(key, shape, dtype, minval, maxval), drawn flat."""
  shape = tuple(shape)
  return jax.random.uniform(key, _flat(shape), dtype, minval, maxval).reshape(shape)


def bernoulli(key, p, shape):
  """jax.random.bernoulli(key, p, shape) for a scalar p, drawn flat."""
  shape = tuple(shape)
  return jax.random.bernoulli(key, p, _flat(shape)).reshape(shape)


__all__ = ["bernoulli", "normal", "uniform"]
