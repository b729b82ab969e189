"""The SIM generator loss (Luo et al. 2024, arXiv 2410.16794, Sec. 3; DESIGN.md section 1).

SIM minimises D(theta) = int w(t) E_{x_t ~ sg(q_t)} d(s_p(x_t) - s_q(x_t)) dt. The score-gradient
theorem turns its gradient into that of the surrogate

    L_G = E[ d'(y_t) . (s_psi(x_t) - grad log q(x_t | x0)) ],  y_t = s_p(x_t) - s_psi(x_t),

with x0 = G_theta(z), x_t = x0 + sigma eps, and the fake score's parameters psi under stop-gradient.
Gradients flow through x_t into the teacher, into D_psi and into d'(y_t).

Units. simjax evaluates the surrogate in denoiser units: y = D_p - D_psi = sigma^2 (s_p - s_psi) and
s_psi - grad log q(x_t | x0) = (D_psi - x0) / sigma^2, so

    per-sample loss = d'(D_p - D_psi) . (D_psi - x0).

This is exactly the theorem applied to the divergence with distance d(sigma^2 y), i.e. a weighting
of the score divergence by noise level; the distance's constants (pseudo-Huber c) are therefore in
the data's own units (per-sample Euclidean norm over all of a sample's dimensions). Configs give c per
dimension (`loss.huber_c_per_dim`, c = huber_c_per_dim * sqrt(D)) so one value fits any data size.

The per-sample normalisation (`normalize=True`, DMD's and SiD's weight 1 / sg(mean |x0 - D_p(x_t)|))
is *outside* the score-gradient theorem: the weight depends on x0 = G_theta(z) through the sample, so
the gradient of the normalised surrogate is the gradient of a divergence whose weighting changes with
the generator, not the gradient of the fixed-weight divergence D(theta). The weight is held under
stop-gradient (as SiD and DMD do), which keeps the direction a positively reweighted per-sample
version of the theorem's; only `normalize=False` has the exact gradient that
tests/test_sim_gradient.py proves against finite differences.
"""
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from simjax.errors import UserError


class Distance(NamedTuple):
  """A distance d on per-sample residuals y [N, ...]: its value [N] and derivative d'(y) (y's shape)."""
  value: Callable[[jax.Array], jax.Array]
  derivative: Callable[[jax.Array], jax.Array]


def per_sample_dot(u, v):
  """Inner product of each sample's values: [N, ...] x [N, ...] -> [N]."""
  return jnp.sum((u * v).reshape(u.shape[0], -1), axis=-1)


def _sq_norm(y):
  return per_sample_dot(y, y)


def _per_sample(v, y):
  return v.reshape((-1,) + (1,) * (y.ndim - 1))


def squared_l2() -> Distance:
  """d(y) = ||y||^2, d'(y) = 2y."""
  return Distance(value=_sq_norm, derivative=lambda y: 2.0 * y)


def pseudo_huber(c: float) -> Distance:
  """d(y) = sqrt(||y||^2 + c^2) - c, d'(y) = y / sqrt(||y||^2 + c^2); c in the data's units."""
  if not 0 < c < float("inf"):
    raise UserError(f"pseudo-Huber constant c must be finite and > 0, got {c}; set --config.loss.huber_c to a "
                     "positive value.")
  def value(y):
    return jnp.sqrt(_sq_norm(y) + c**2) - c
  def derivative(y):
    return y / _per_sample(jnp.sqrt(_sq_norm(y) + c**2), y)
  return Distance(value=value, derivative=derivative)


def huber_constant(loss_config, data_dim: int) -> float:
  """pseudo-Huber c in data units: `huber_c` where set (> 0), else huber_c_per_dim * sqrt(data_dim)."""
  absolute = float(loss_config.huber_c or 0.0)
  if absolute:
    return absolute
  per_dim = float(loss_config.huber_c_per_dim or 0.0)
  if not per_dim > 0 or per_dim == float("inf"):
    raise UserError(f"loss.huber_c_per_dim must be a finite value > 0, got {loss_config.huber_c_per_dim}; "
                     "set --config.loss.huber_c_per_dim (c = huber_c_per_dim * sqrt(D)) or --config.loss.huber_c.")
  return per_dim * float(data_dim) ** 0.5


DISTANCES = {
    "l2": lambda cfg, dim: squared_l2(),
    "pseudo_huber": lambda cfg, dim: pseudo_huber(huber_constant(cfg, dim)),
}


def get_distance(loss_config, data_dim: int) -> Distance:
  """Looks up `loss_config.distance` in DISTANCES (data_dim: dimensions per sample); register new ones there."""
  name = loss_config.distance
  if name not in DISTANCES:
    raise UserError(f"unknown distance {name!r}; set --config.loss.distance to one of {sorted(DISTANCES)}.")
  return DISTANCES[name](loss_config, data_dim)


def dmd_normalizer(x0, denoised_teacher, floor=1e-5):
  """Per-sample weight 1 / sg(mean |x0 - D_p(x_t)|) clipped at `floor` (DMD, SiD)."""
  mad = jnp.mean(jnp.abs(x0 - denoised_teacher).reshape(x0.shape[0], -1), axis=-1)
  return 1.0 / jax.lax.stop_gradient(jnp.maximum(mad, floor))


def sim_surrogate(x0, denoised_teacher, denoised_fake, distance: Distance, *, normalize: bool = True,
                  normalize_floor: float = 1e-5, detach_distance_grad: bool = False):
  """Per-sample SIM surrogate d'(D_p - D_psi) . (D_psi - x0), optionally normalised; returns [N].

  `detach_distance_grad=True` is the *wrong* construction (d'(y_t) under stop-gradient), kept only so
  tests can show they detect it.
  """
  y = denoised_teacher - denoised_fake
  u = distance.derivative(y)
  if detach_distance_grad:
    u = jax.lax.stop_gradient(u)
  per_sample = per_sample_dot(u, denoised_fake - x0)
  if normalize:
    per_sample = per_sample * dmd_normalizer(x0, denoised_teacher, normalize_floor)
  return per_sample
