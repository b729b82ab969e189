"""Discrete-time VP teachers (DDPM epsilon-prediction on T trained timesteps: PixArt, DiT, Stable
Diffusion) as EDM denoisers, so every simjax loss and sampler applies to them unchanged.

A DDPM model sees x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. Dividing by sqrt(abar_t) gives EDM's
x = x0 + sigma_t eps with sigma_t = sqrt((1 - abar_t) / abar_t) (Karras et al. 2022, Table 1, VP
column, and their iDDPM treatment of discrete models), hence

    D(x, sigma) = x - sigma * eps(x / sqrt(1 + sigma^2), t(sigma))[..., :C],

with t(sigma) the trained timestep whose sigma_t is nearest (SIM's release does the same; a continuous
VP time would sit 0.5-3.4 steps off the integers the model was trained on). The network's extra
output channels (learned variance) are dropped. At sigma = sigma_t, D equals the DDPM scheduler's
`pred_original_sample`.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear")


def ddpm_sigmas(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                beta_schedule: str = "linear") -> np.ndarray:
  """sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0..T-1 (increasing), float64.

  'linear': betas evenly spaced (DDPM, PixArt, DiT); 'scaled_linear': their square roots evenly
  spaced (Stable Diffusion)."""
  if beta_schedule == "linear":
    betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
  elif beta_schedule == "scaled_linear":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
  else:
    raise ValueError(f"beta_schedule={beta_schedule!r}; use one of {BETA_SCHEDULES}.")
  alphas_cumprod = np.cumprod(1.0 - betas)
  return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def nearest_timestep(sigma, sigmas: np.ndarray):
  """The index t of the sigma_t nearest each sigma (sigmas increasing), int32 of sigma's shape."""
  table = jnp.asarray(sigmas, jnp.float32)
  sigma = jnp.asarray(sigma, jnp.float32)
  upper = jnp.clip(jnp.searchsorted(table, sigma), 1, table.shape[0] - 1)
  lower = upper - 1
  return jnp.where(jnp.abs(sigma - table[lower]) <= jnp.abs(table[upper] - sigma), lower, upper).astype(jnp.int32)


class DiscreteVPPrecond(nn.Module):
  """D(x, sigma) of an epsilon-prediction network `model(x_t, t, cond, train=...)` on T timesteps.

  The interface of simjax's denoisers: `__call__(x, sigma, cond=None, augment_labels=None,
  train=False)`, x NHWC float32, D float32 of x's shape. `cond` goes to the network as it is (class
  labels, or a text condition)."""
  model: nn.Module
  img_resolution: int
  img_channels: int
  label_dim: int = 0
  num_train_timesteps: int = 1000
  beta_start: float = 1e-4
  beta_end: float = 0.02
  beta_schedule: str = "linear"

  @property
  def sigmas(self) -> np.ndarray:
    return ddpm_sigmas(self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule)

  @property
  def sigma_min(self) -> float:
    return float(self.sigmas[0])

  @property
  def sigma_max(self) -> float:
    return float(self.sigmas[-1])

  def timestep(self, sigma):
    """t(sigma): the nearest trained timestep."""
    return nearest_timestep(sigma, self.sigmas)

  def __call__(self, x, sigma, cond=None, augment_labels: Optional[Any] = None, train: bool = False):
    if augment_labels is not None:
      raise ValueError("discrete-time VP teachers take no augmentation labels.")
    x = jnp.asarray(x, jnp.float32)
    sigma = jnp.asarray(sigma, jnp.float32)
    sigma = jnp.broadcast_to(sigma.reshape(-1) if sigma.ndim else sigma, x.shape[:1])
    scale = jax.lax.rsqrt(1.0 + jnp.square(sigma))[:, None, None, None]
    model_dtype = getattr(self.model, "dtype", jnp.float32)
    eps = self.model((scale * x).astype(model_dtype), self.timestep(sigma).astype(jnp.float32), cond, train=train)
    eps = eps[..., : self.img_channels].astype(jnp.float32)
    return x - sigma[:, None, None, None] * eps
