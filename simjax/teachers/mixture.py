"""The analytic teacher: a diagonal Gaussian mixture, whose diffused denoiser and score are exact.

p0 = sum_k w_k N(mu_k, diag(s_k^2)) diffused to noise level sigma is the mixture with variances
s_k^2 + sigma^2 (DESIGN.md section 1). Its denoiser E[x0 | x_t] is the responsibility-weighted sum
of each component's posterior mean, so the teacher is exact at every sigma: the ground truth that
makes SIM testable without a trained network.

The mixture lives in a flax variable collection 'mixture' ({'means', 'stds', 'weights'}) so that
the teacher is called exactly like a network teacher: `module.apply(variables, x, sigma)`.
"""
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from simjax.errors import UserError

# A true sample lies farther than this chi-square quantile from its own component with probability 0.1%.
OFF_MODE_QUANTILE = 0.999
# Largest |mean| or std accepted: float32 squared distances of such values in 64 dims stay finite.
MAX_ABS_VALUE = 1e15


class Mixture(NamedTuple):
  means: jax.Array    # [K, D]
  stds: jax.Array     # [K, D]
  weights: jax.Array  # [K]


def mixture_from_config(teacher_config) -> Mixture:
  """Validates `means`, `stds`, `weights` from the config; one-line errors name the fix."""
  try:
    means = np.asarray(teacher_config.means, np.float64)
    stds = np.asarray(teacher_config.stds, np.float64)
    weights = np.asarray(teacher_config.weights, np.float64)
  except (ValueError, TypeError) as e:
    raise UserError(f"teacher mixture is not numeric or ragged ({e}); pass e.g. "
                     "--config.teacher.means='((0.,1.),(1.,0.))' with one row per component.") from None
  if means.ndim != 2 or not 1 <= means.shape[1] <= 64 or means.shape[0] < 1:
    raise UserError(f"teacher.means must be a [K, D] nested tuple with D in 1..64, got shape {means.shape}.")
  k, d = means.shape
  if stds.ndim == 1 and stds.shape[0] == k:
    stds = np.repeat(stds[:, None], d, axis=1)  # one isotropic std per component
  if stds.shape != (k, d):
    raise UserError(f"teacher.stds must have one entry per component ({k},) or per coordinate ({k}, {d}), "
                     f"got shape {stds.shape}; make it match teacher.means.")
  if weights.shape != (k,):
    raise UserError(f"teacher.weights must have one entry per component ({k}), got shape {weights.shape}; "
                     "make it match teacher.means.")
  # Evaluation works in float32 in the user's units (squared distances of samples): larger values
  # would overflow to inf mid-run instead of here.
  if not np.all(np.isfinite(means)) or np.abs(means).max() > MAX_ABS_VALUE:
    raise UserError(f"teacher.means must be finite and at most {MAX_ABS_VALUE:.0e} in magnitude, got max |mean| "
                     f"{np.abs(means).max():.3g}; set --config.teacher.means in smaller units.")
  if not np.all(np.isfinite(stds)) or stds.max() > MAX_ABS_VALUE:
    raise UserError(f"teacher.stds must be finite and at most {MAX_ABS_VALUE:.0e}, got max {stds.max():.3g}; "
                     "set --config.teacher.stds in smaller units.")
  if not np.all(stds > 0):
    raise UserError(f"teacher.stds must all be > 0, got min {stds.min()}; use small positive stds instead.")
  if not np.all(weights > 0) or abs(weights.sum() - 1.0) > 1e-4:
    raise UserError(f"teacher.weights must be positive and sum to 1, got sum {weights.sum():.6f}; "
                     "normalise them.")
  return Mixture(jnp.asarray(means, jnp.float32), jnp.asarray(stds, jnp.float32),
                 jnp.asarray(weights / weights.sum(), jnp.float32))


def _component_log_probs(mix: Mixture, x, sigma):
  """log w_k + log N(x; mu_k, s_k^2 + sigma^2): [N, K], and the diffused variances [N, K, D]."""
  var = jnp.square(mix.stds)[None] + jnp.square(sigma)[:, None, None]
  diff = x[:, None, :] - mix.means[None]
  log_n = -0.5 * jnp.sum(diff**2 / var + jnp.log(2 * jnp.pi * var), axis=-1)
  return jnp.log(mix.weights)[None] + log_n, var


def log_density(mix: Mixture, x, sigma):
  """log p_sigma(x) of the diffused mixture: [N]."""
  lp, _ = _component_log_probs(mix, x, jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1]))
  return jax.nn.logsumexp(lp, axis=-1)


def denoise(mix: Mixture, x, sigma):
  """Exact D(x, sigma) = E[x0 | x_t = x]: [N, D]."""
  sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
  lp, var = _component_log_probs(mix, x, sigma)
  resp = jax.nn.softmax(lp, axis=-1)                                 # [N, K]
  shrink = jnp.square(mix.stds)[None] / var                          # s_k^2 / (s_k^2 + sigma^2)
  post_mean = mix.means[None] + shrink * (x[:, None, :] - mix.means[None])
  return jnp.sum(resp[..., None] * post_mean, axis=1)


def score(mix: Mixture, x, sigma):
  """Exact score grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2."""
  s = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])[:, None]
  return (denoise(mix, x, sigma) - x) / s**2


def sample(mix: Mixture, key, n: int):
  """n exact samples of the clean mixture, and their component indices."""
  k_comp, k_noise = jax.random.split(key)
  comp = jax.random.categorical(k_comp, jnp.log(mix.weights), shape=(n,))
  z = jax.random.normal(k_noise, (n, mix.means.shape[1]), jnp.float32)
  return mix.means[comp] + mix.stds[comp] * z, comp


def nearest_mean_mass(mix: Mixture, x):
  """Fraction of samples assigned to each component by nearest mean: [K] (blind to anisotropy)."""
  d2 = jnp.sum((x[:, None, :] - mix.means[None]) ** 2, axis=-1)
  idx = jnp.argmin(d2, axis=-1)
  return jnp.bincount(idx, length=mix.means.shape[0]) / x.shape[0]


def _squared_mahalanobis(mix: Mixture, x):
  """||(x - mu_k) / s_k||^2 for every sample and component: [N, K]."""
  x = jnp.asarray(x, jnp.float32)
  return jnp.sum(jnp.square((x[:, None, :] - mix.means[None]) / mix.stds[None]), axis=-1)


@jax.jit
def _mode_statistics(mix: Mixture, x, threshold):
  lp, _ = _component_log_probs(mix, jnp.asarray(x, jnp.float32), jnp.zeros(x.shape[:1], jnp.float32))
  idx = jnp.argmax(lp, axis=-1)
  mass = jnp.bincount(idx, length=mix.means.shape[0]) / x.shape[0]
  off = jnp.mean(jnp.min(_squared_mahalanobis(mix, x), axis=-1) > threshold)
  return mass, off


def off_mode_threshold(dim: int, quantile: float = OFF_MODE_QUANTILE) -> float:
  """The chi-square(dim) quantile of the squared Mahalanobis distance of a true component sample."""
  return float(scipy.stats.chi2.ppf(quantile, dim))


def mode_statistics(mix: Mixture, x, quantile: float = OFF_MODE_QUANTILE):
  """(mode mass [K], off-mode fraction) of samples x [N, D].

  mode mass: the fraction assigned to each component by likelihood (argmax_k w_k N(x; mu_k, S_k)),
  which scores anisotropic components right where the nearest mean does not.
  off-mode fraction: the fraction whose squared Mahalanobis distance to *every* component exceeds
  the chi-square(D) `quantile`: a true sample is off-mode with probability <= 1 - quantile in any
  dimension, while a ring or a bridge between modes puts its mass there.
  """
  mass, off = _mode_statistics(mix, jnp.asarray(x, jnp.float32), off_mode_threshold(mix.means.shape[1], quantile))
  return np.asarray(mass), float(off)


class GaussianMixtureDenoiser(nn.Module):
  """The analytic teacher behind simjax's denoiser interface; its mixture is the 'mixture' collection."""

  @nn.compact
  def __call__(self, x, sigma, cond=None, augment_labels=None, train=False):
    del cond, augment_labels, train  # unconditional and deterministic
    v = self.variables["mixture"]
    return denoise(Mixture(v["means"], v["stds"], v["weights"]), x.astype(jnp.float32), sigma)


def teacher_variables(mix: Mixture):
  return {"mixture": mix._asdict()}
