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
the data's own units (per-sample Euclidean norm over all of a sample's dimensions).
"""
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Distance(NamedTuple):
  """A distance d on per-sample residuals y [N, ...]: its value [N] and derivative d'(y) (y's shape)."""
  value: Callable[[jax.Array], jax.Array]
  derivative: Callable[[jax.Array], jax.Array]


def _sq_norm(y):
  return jnp.sum(jnp.square(y).reshape(y.shape[0], -1), axis=-1)


def _per_sample(v, y):
  return v.reshape((-1,) + (1,) * (y.ndim - 1))


def squared_l2() -> Distance:
  """d(y) = ||y||^2, d'(y) = 2y."""
  return Distance(value=_sq_norm, derivative=lambda y: 2.0 * y)


def pseudo_huber(c: float) -> Distance:
  """d(y) = sqrt(||y||^2 + c^2) - c, d'(y) = y / sqrt(||y||^2 + c^2); c in the data's units."""
  if not c > 0:
    raise ValueError(f"pseudo-Huber constant c must be > 0, got {c}; set --config.loss.huber_c to a positive value.")
  def value(y):
    return jnp.sqrt(_sq_norm(y) + c**2) - c
  def derivative(y):
    return y / _per_sample(jnp.sqrt(_sq_norm(y) + c**2), y)
  return Distance(value=value, derivative=derivative)


DISTANCES = {
    "l2": lambda cfg: squared_l2(),
    "pseudo_huber": lambda cfg: pseudo_huber(float(cfg.huber_c)),
}


def get_distance(loss_config) -> Distance:
  """Looks up `loss_config.distance` in DISTANCES; register new distances there."""
  name = loss_config.distance
  if name not in DISTANCES:
    raise ValueError(f"unknown distance {name!r}; set --config.loss.distance to one of {sorted(DISTANCES)}.")
  return DISTANCES[name](loss_config)


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
  per_sample = jnp.sum((u * (denoised_fake - x0)).reshape(x0.shape[0], -1), axis=-1)
  if normalize:
    per_sample = per_sample * dmd_normalizer(x0, denoised_teacher, normalize_floor)
  return per_sample


def sim_generator_loss(gen_params, fake_params, teacher_params, *, generate, teacher_denoise=None, fake_denoise=None,
                       eps, sigma, distance: Distance, normalize: bool = True, normalize_floor: float = 1e-5,
                       denoise_pair=None):
  """Mean SIM surrogate over a batch; `jax.grad` of it w.r.t. gen_params is SIM's generator gradient.

  Args:
    gen_params: generator parameters (differentiated).
    fake_params: fake-score parameters; stop-gradient is applied here, and only here.
    teacher_params: frozen teacher parameters.
    generate: gen_params -> x0 [N, ...] (the generator's one-step samples, its noise closed over).
    teacher_denoise, fake_denoise: (params, x_t, sigma) -> D(x_t, sigma).
    denoise_pair: instead of the two, (teacher_params, fake_params, x_t, sigma) -> (D_teacher, D_fake)
      from one call (both see the same x_t).
    eps: diffusion noise, x0's shape; sigma: per-sample noise levels [N].
  Returns:
    (loss, aux) with aux holding x0 and the per-sample surrogate.
  """
  fake_params = jax.lax.stop_gradient(fake_params)
  teacher_params = jax.lax.stop_gradient(teacher_params)
  x0 = generate(gen_params)
  s = sigma.reshape((-1,) + (1,) * (x0.ndim - 1))
  x_t = x0 + s * eps
  if denoise_pair is not None:
    d_teacher, d_fake = denoise_pair(teacher_params, fake_params, x_t, sigma)
  else:
    d_teacher = teacher_denoise(teacher_params, x_t, sigma)
    d_fake = fake_denoise(fake_params, x_t, sigma)
  per_sample = sim_surrogate(x0, d_teacher, d_fake, distance, normalize=normalize, normalize_floor=normalize_floor)
  return jnp.mean(per_sample), {"x0": x0, "per_sample": per_sample}
