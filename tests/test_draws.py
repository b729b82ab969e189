"""simjax.draws: the same bits as jax.random's draws of the same shape, in both threefry modes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simjax import draws

SHAPES = [(5,), (3, 4), (2, 3, 5, 7), (4, 1, 1, 1), ()]


@pytest.fixture(params=[True, False], ids=["partitionable", "classic"])
def threefry_mode(request):
  before = jax.config.jax_threefry_partitionable
  jax.config.update("jax_threefry_partitionable", request.param)
  yield request.param
  jax.config.update("jax_threefry_partitionable", before)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_flat_draws_are_jax_randoms_own(threefry_mode, shape):
  key = jax.random.key(11)
  pairs = [
      (draws.normal(key, shape), jax.random.normal(key, shape)),
      (draws.normal(key, shape, jnp.bfloat16), jax.random.normal(key, shape, jnp.bfloat16)),
      (draws.uniform(key, shape, minval=-1.0, maxval=1.0), jax.random.uniform(key, shape, minval=-1.0, maxval=1.0)),
      (draws.bernoulli(key, 0.9, shape), jax.random.bernoulli(key, 0.9, shape)),
  ]
  for ours, theirs in pairs:
    assert ours.shape == theirs.shape == shape and ours.dtype == theirs.dtype
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  # The check can fail: a transposed draw is another array.
  if len(shape) == 2:
    wrong = jax.random.normal(key, shape[::-1]).T
    assert not np.array_equal(np.asarray(wrong), np.asarray(pairs[0][1]))


def test_flat_draws_inside_jit_match_and_keep_the_batch_sharding():
  """Under jit with a batch-sharded output (how the steps use them) the values are the same."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  key = jax.random.key(2)
  ours = jax.jit(lambda k: draws.normal(k, (8, 4, 4, 3)), out_shardings=sharding)(key)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.random.normal(key, (8, 4, 4, 3))))
