"""Sample-based distances for vector data: sliced Wasserstein-2 and RBF-kernel MMD."""
import jax
import jax.numpy as jnp
import numpy as np


def random_directions(dim: int, num: int, seed: int = 0) -> np.ndarray:
  """Fixed unit directions, so every sample source is measured on the same projections."""
  v = np.random.default_rng(seed).standard_normal((num, dim))
  return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


@jax.jit
def _sliced_w2_sq(x, y, directions):
  px = jnp.sort(x @ directions.T, axis=0)
  py = jnp.sort(y @ directions.T, axis=0)
  return jnp.mean(jnp.square(px - py))


def sliced_w2(x, y, num_projections: int = 256, seed: int = 0) -> float:
  """Sliced W2 over fixed random directions: sqrt(mean_dir W2^2 of the 1-D projections).

  Equal sample counts make each 1-D W2 exact: the sorted projections are matched one to one.
  """
  x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
  if x.shape != y.shape:
    n = min(len(x), len(y))
    x, y = x[:n], y[:n]
  d = random_directions(x.shape[1], num_projections, seed)
  return float(jnp.sqrt(_sliced_w2_sq(x, y, d)))


@jax.jit
def _mmd2_unbiased(x, y, bandwidths):
  def kernel_mean(a, b, same):
    d2 = jnp.sum(a**2, 1)[:, None] + jnp.sum(b**2, 1)[None] - 2 * a @ b.T
    k = jnp.mean(jnp.exp(-jnp.maximum(d2, 0)[None] / (2 * bandwidths[:, None, None]**2)), axis=0)
    n = a.shape[0]
    if same:
      return (jnp.sum(k) - jnp.trace(k)) / (n * (n - 1))
    return jnp.mean(k)
  return kernel_mean(x, x, True) + kernel_mean(y, y, True) - 2 * kernel_mean(x, y, False)


def mmd(x, y, bandwidths=None, max_samples: int = 4000) -> float:
  """Unbiased squared MMD with a mixture of RBF kernels (bandwidths default to multiples of the
  median pairwise distance of y), on at most `max_samples` of each set."""
  x = np.asarray(x, np.float32)[:max_samples]
  y = np.asarray(y, np.float32)[:max_samples]
  if bandwidths is None:
    sub = y[:1000]
    d = np.sqrt(np.maximum(((sub[:, None] - sub[None]) ** 2).sum(-1), 0))
    med = float(np.median(d[np.triu_indices(len(sub), 1)]))
    bandwidths = [med * f for f in (0.1, 0.25, 0.5, 1.0, 2.0)]
  return float(_mmd2_unbiased(x, y, jnp.asarray(bandwidths, jnp.float32)))
