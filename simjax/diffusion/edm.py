"""EDM building blocks (Karras et al. 2022): preconditioning and noise levels.

Everything here is a pure function of arrays, usable under jit, grad and vmap.
Notation: x_t = x0 + sigma * eps, D(x, sigma) predicts x0.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from simjax import draws

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0


class Preconditioning(NamedTuple):
  c_skip: jax.Array
  c_out: jax.Array
  c_in: jax.Array
  c_noise: jax.Array


def edm_precondition(sigma, sigma_data=SIGMA_DATA) -> Preconditioning:
  """EDM's coefficients (Karras et al. 2022, Table 1): D = c_skip x + c_out F(c_in x, c_noise)."""
  sigma = jnp.asarray(sigma, jnp.float32)
  s2, d2 = sigma**2, sigma_data**2
  return Preconditioning(
      c_skip=d2 / (s2 + d2),
      c_out=sigma * sigma_data / jnp.sqrt(s2 + d2),
      c_in=1.0 / jnp.sqrt(s2 + d2),
      c_noise=jnp.log(sigma) / 4.0,
  )


def expand_to(sigma, x):
  """Reshapes a per-sample sigma [N] (or a scalar) to broadcast against x [N, ...]."""
  sigma = jnp.asarray(sigma, jnp.float32)
  if sigma.ndim == 0:
    sigma = jnp.broadcast_to(sigma, x.shape[:1])
  return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def karras_sigma(t, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
  """Maps t in [0, 1] to the Karras rho-grid: t=0 -> sigma_max, t=1 -> sigma_min."""
  inv_rho = 1.0 / rho
  return (sigma_max**inv_rho + t * (sigma_min**inv_rho - sigma_max**inv_rho))**rho


def karras_sigmas(num_steps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
  """The sampler's discretisation: num_steps decreasing sigmas followed by a final 0."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}; use 18 for EDM's CIFAR-10 default.")
  t = jnp.arange(num_steps, dtype=jnp.float32) / max(num_steps - 1, 1)
  sigmas = karras_sigma(t, sigma_min, sigma_max, rho)
  return jnp.concatenate([sigmas, jnp.zeros((1,), jnp.float32)])


def sample_sigma_lognormal(key, shape, p_mean=-1.2, p_std=1.2):
  """EDM training noise levels: ln sigma ~ N(p_mean, p_std^2)."""
  return jnp.exp(p_mean + p_std * draws.normal(key, shape, jnp.float32))


def sample_sigma_karras_uniform(key, shape, t_max=0.8, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, t_min=0.0):
  """Generator-loss noise levels in SiD's (and SIM's, DMD2's) direction: t ~ U[t_min, t_max] and

      sigma = (sigma_max^(1/rho) + (1 - t) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,

  so t = 0 gives sigma_min and t_max caps the *largest* level: t_max = 0.8, rho = 7 puts sigma in
  [0.002, 24.4] with median ~1 (SiD, sid_training_loop's `sigma = (... + (1 - t) ...) ** rho`).
  """
  t = draws.uniform(key, shape, jnp.float32, t_min, t_max)
  return karras_sigma(1.0 - t, sigma_min, sigma_max, rho)


def edm_loss_weight(sigma, sigma_data=SIGMA_DATA):
  """EDM's DSM weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
  return (sigma**2 + sigma_data**2) / (sigma * sigma_data)**2
