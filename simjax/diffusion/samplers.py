"""EDM samplers (Karras et al. 2022, Algorithms 1 and 2): Heun, Euler, and stochastic S_churn.

`denoise(x, sigma)` is any denoiser closure (sigma per sample [N]). Use inside jit; the step loop is a
`lax.fori_loop`, so compile time does not grow with the number of steps.
"""
import functools
import math

import jax
import jax.numpy as jnp

from simjax import draws
from simjax.diffusion import edm


def num_function_evals(num_steps: int, solver: str = "heun") -> int:
  """Network evaluations of a sampler run: Heun's last step is Euler (EDM: 18 steps -> 35 NFE)."""
  return 2 * num_steps - 1 if solver == "heun" else num_steps


def _check(solver, s_churn, key):
  if solver not in ("heun", "euler"):
    raise ValueError(f"unknown solver {solver!r}; use 'heun' or 'euler'.")
  if s_churn > 0 and key is None:
    raise ValueError("stochastic sampling (s_churn > 0) needs a PRNG key; pass key=...")


def _make_step(denoise, sigmas, num_steps, s_churn, s_min, s_max, s_noise, key):
  """One EDM step i: sigma_i -> sigma_{i+1}, with optional churn and Heun correction."""
  gamma_max = min(s_churn / num_steps, math.sqrt(2.0) - 1.0)

  def derivative(x, s):
    return (x - denoise(x, jnp.full(x.shape[:1], s, jnp.float32))) / s

  def step(i, x, with_correction):
    s_cur, s_next = sigmas[i], sigmas[i + 1]
    if s_churn > 0:
      gamma = jnp.where((s_cur >= s_min) & (s_cur <= s_max), gamma_max, 0.0)
      s_hat = s_cur + gamma * s_cur
      noise = draws.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
      x = x + jnp.sqrt(s_hat**2 - s_cur**2) * s_noise * noise
    else:
      s_hat = s_cur
    d = derivative(x, s_hat)
    x_next = x + (s_next - s_hat) * d
    if with_correction:
      x_next = x + (s_next - s_hat) * 0.5 * (d + derivative(x_next, s_next))
    return x_next
  return step


def edm_sample(denoise, latents, *, num_steps=18, sigma_min=edm.SIGMA_MIN, sigma_max=edm.SIGMA_MAX,
               rho=edm.RHO, solver="heun", s_churn=0.0, s_min=0.0, s_max=float("inf"), s_noise=1.0, key=None,
               sigmas=None):
  """Runs EDM's sampler from latents ~ N(0, I) (scaled here by sigma_max) down to sigma = 0.

  solver: 'heun' (2nd order, deterministic when s_churn = 0) or 'euler'.
  s_churn > 0 adds EDM's stochastic churn (Algorithm 2) and needs `key`.
  sigmas: an explicit decreasing schedule ending at 0 (e.g. a discrete teacher's trained levels; Euler
    on it is DDIM with eta 0) in place of Karras' num_steps/sigma_min/sigma_max/rho.
  The steps run in a `lax.fori_loop`: use inside jit. For convolutional networks on CPU prefer
  `make_stepwise_sampler` (XLA:CPU runs convolutions inside while-loops far slower).
  """
  _check(solver, s_churn, key)
  if sigmas is None:
    sigmas = edm.karras_sigmas(num_steps, sigma_min, sigma_max, rho)
  else:
    sigmas = jnp.asarray(sigmas, jnp.float32)
    num_steps = sigmas.shape[0] - 1
  step = _make_step(denoise, sigmas, num_steps, s_churn, s_min, s_max, s_noise, key)
  x = latents.astype(jnp.float32) * sigmas[0]
  x = jax.lax.fori_loop(0, num_steps - 1, functools.partial(step, with_correction=solver == "heun"), x)
  # The last step lands on sigma = 0, where the Heun correction is undefined: Euler (EDM does the same).
  return step(num_steps - 1, x, with_correction=False)


def make_stepwise_sampler(denoise_fn, *, num_steps=18, sigma_min=edm.SIGMA_MIN, sigma_max=edm.SIGMA_MAX,
                          rho=edm.RHO, solver="heun", s_churn=0.0, s_min=0.0, s_max=float("inf"), s_noise=1.0):
  """EDM's sampler driven from the host: one compiled step, dispatched num_steps times.

  Returns sample(params, latents, key=None). denoise_fn(params, x, sigma) takes its parameters as an
  argument, so large networks are never baked into the compiled step as constants; build the sampler
  once and call it per batch, and the step compiles once. Same results as `edm_sample`.
  """
  _check(solver, 0.0, None)  # the solver now; the churn key on each call
  sigmas = edm.karras_sigmas(num_steps, sigma_min, sigma_max, rho)

  @functools.partial(jax.jit, static_argnums=3)
  def one(p, x, i, with_correction, k):
    step = _make_step(lambda v, s: denoise_fn(p, v, s), sigmas, num_steps, s_churn, s_min, s_max, s_noise, k)
    return step(i, x, with_correction)

  def sample(params, latents, key=None):
    _check(solver, s_churn, key)
    x = jnp.asarray(latents, jnp.float32) * sigmas[0]
    for i in range(num_steps):
      x = one(params, x, jnp.int32(i), solver == "heun" and i < num_steps - 1, key)
    return x
  return sample


def heun_sample(denoise, latents, num_steps=18, **kwargs):
  """EDM's deterministic Heun sampler: 18 steps = 35 network evaluations by default."""
  return edm_sample(denoise, latents, num_steps=num_steps, solver="heun", **kwargs)

