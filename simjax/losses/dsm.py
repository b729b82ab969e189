"""EDM denoising score matching (Karras et al. 2022, Sec. 5, Eq. 2 with lambda(sigma) of Table 1)."""
import chex
import jax
import jax.numpy as jnp

from simjax import draws
from simjax.diffusion import edm


def edm_dsm_loss(denoised, x0, sigma, sigma_data=edm.SIGMA_DATA):
  """Per-sample EDM loss lambda(sigma) ||D(x0 + sigma eps, sigma) - x0||^2 summed over dims: [N]."""
  sq = jnp.sum(jnp.square(denoised - x0).reshape(x0.shape[0], -1), axis=-1)
  return edm.edm_loss_weight(sigma, sigma_data) * sq


def uncertainty_weighted(per_sample, logvar, data_dim: int):
  """EDM2's loss with its learned uncertainty u(sigma) (Karras et al. 2024, Eq. 21), per sample [N]:
  per_sample / e^u + data_dim u, for a per-sample loss summed over data_dim elements (EDM2 adds u per element).
  For fixed per_sample its minimum is at u = log(per_sample / data_dim), the per-element loss."""
  chex.assert_equal_shape([per_sample, logvar])
  return per_sample * jnp.exp(-logvar) + float(data_dim) * logvar


def epsilon_loss(denoised, x0, sigma):
  """Per-sample DDPM loss ||eps_hat - eps||^2 summed over dims, eps_hat = (x_t - D) / sigma: [N]. The same
  as ||D - x0||^2 / sigma^2, the weighting a discrete epsilon-prediction teacher was trained with."""
  sq = jnp.sum(jnp.square(denoised - x0).reshape(x0.shape[0], -1), axis=-1)
  return sq / jnp.square(sigma)


def draw_grid_noise(key, x0_shape, grid):
  """A trained timestep per row, uniform (DDPM's training draw), as its sigma, and Gaussian noise."""
  k_t, k_eps = jax.random.split(key)
  table = jnp.asarray(grid, jnp.float32)
  sigma = table[jax.random.randint(k_t, x0_shape[:1], 0, table.shape[0])]
  return sigma, draws.normal(k_eps, x0_shape, jnp.float32)


def dsm_loss(params, denoise, x0, sigma, eps, sigma_data=edm.SIGMA_DATA):
  """Mean EDM DSM loss of `denoise(params, x_t, sigma)` on clean samples x0 with given noise.

  Used for the fake score (on stop-gradient generator samples) and for teacher training (on data).
  """
  chex.assert_equal_shape([x0, eps])
  chex.assert_shape(sigma, x0.shape[:1])
  x_t = x0 + edm.expand_to(sigma, x0) * eps
  denoised = denoise(params, x_t, sigma)
  chex.assert_equal_shape([denoised, x0])
  return jnp.mean(edm_dsm_loss(denoised, x0, sigma, sigma_data))


def draw_dsm_noise(key, x0_shape, p_mean=-1.2, p_std=1.2):
  """Noise level (log-normal) and Gaussian noise for one DSM batch."""
  k_sigma, k_eps = jax.random.split(key)
  sigma = edm.sample_sigma_lognormal(k_sigma, x0_shape[:1], p_mean, p_std)
  return sigma, draws.normal(k_eps, x0_shape, jnp.float32)
