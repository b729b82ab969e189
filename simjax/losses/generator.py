"""Generator losses of score distillation as a registry, selected by `loss.name` (DESIGN.md section 1).

Every entry shares one per-sample signature in denoiser units,

    per_sample(x0, a, b, sigma, weight) -> [N],   a = D_p(x_t) (teacher), b = D_psi(x_t) (fake score),

with the fake score's parameters already stopped and `weight` [N] the per-sample normaliser (1 where
`loss.normalize` is off). `generator_loss` draws x_t = x0 + sigma eps, calls the two denoisers and
averages; gradients reach the generator through x0 and x_t. A new loss (SiD, Diff-Instruct, DMD) is
one function registered here with `register`.
"""
from typing import Callable, Dict

import chex
import jax
import jax.numpy as jnp

from simjax.errors import UserError
from simjax.losses import sim

PerSampleLoss = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
# name -> (loss config, values per sample) -> per-sample loss
LOSSES: Dict[str, Callable[[object, int], PerSampleLoss]] = {}
DEFAULT = "sim"


def register(name: str):
  def add(factory):
    LOSSES[name] = factory
    return factory
  return add


def sim_per_sample(distance: sim.Distance) -> PerSampleLoss:
  """SIM's surrogate weight * d'(a - b) . (b - x0) with distance d (losses/sim.py)."""
  def per_sample(x0, a, b, sigma, weight):
    del sigma  # SIM's noise-level weighting is its distance in denoiser units (losses/sim.py)
    return weight * sim.sim_surrogate(x0, a, b, distance, normalize=False)
  return per_sample


@register("sim")
def _sim(loss_config, data_dim: int) -> PerSampleLoss:
  return sim_per_sample(sim.get_distance(loss_config, data_dim))


def get_generator_loss(loss_config, data_dim: int) -> PerSampleLoss:
  """The registered loss `loss_config.name` (default 'sim') for samples of `data_dim` values."""
  name = loss_config.get("name", DEFAULT) or DEFAULT
  if name not in LOSSES:
    raise UserError(f"unknown generator loss {name!r}; set --config.loss.name to one of {sorted(LOSSES)}.")
  return LOSSES[name](loss_config, data_dim)


def generator_loss(gen_params, fake_params, teacher_params, *, generate, per_sample_loss: PerSampleLoss, eps, sigma,
                   teacher_denoise=None, fake_denoise=None, denoise_pair=None, normalize: bool = True,
                   normalize_floor: float = 1e-5):
  """Mean generator loss over a batch; `jax.grad` of it w.r.t. gen_params is the generator's gradient.

  Args:
    gen_params: generator parameters (differentiated).
    fake_params: fake-score parameters; stop-gradient is applied here, and only here.
    teacher_params: frozen teacher parameters.
    generate: gen_params -> x0 [N, ...] (the generator's one-step samples, its noise closed over).
    per_sample_loss: an entry of LOSSES, built.
    teacher_denoise, fake_denoise: (params, x_t, sigma) -> D(x_t, sigma).
    denoise_pair: instead of the two, (teacher_params, fake_params, x_t, sigma) -> (D_teacher, D_fake)
      from one call (both see the same x_t).
    eps: diffusion noise, x0's shape; sigma: per-sample noise levels [N].
    normalize: weight each sample by DMD/SiD's 1 / sg(mean |x0 - D_p(x_t)|) (losses/sim.py).
  Returns:
    (loss, aux) with aux holding x0 and the per-sample loss.
  """
  fake_params = jax.lax.stop_gradient(fake_params)
  teacher_params = jax.lax.stop_gradient(teacher_params)
  x0 = generate(gen_params)
  chex.assert_equal_shape([x0, eps])
  chex.assert_shape(sigma, x0.shape[:1])
  s = sigma.reshape((-1,) + (1,) * (x0.ndim - 1))
  x_t = x0 + s * eps
  if denoise_pair is not None:
    d_teacher, d_fake = denoise_pair(teacher_params, fake_params, x_t, sigma)
  else:
    d_teacher = teacher_denoise(teacher_params, x_t, sigma)
    d_fake = fake_denoise(fake_params, x_t, sigma)
  chex.assert_equal_shape([x0, d_teacher, d_fake])
  weight = (sim.dmd_normalizer(x0, d_teacher, normalize_floor) if normalize
            else jnp.ones(x0.shape[:1], jnp.float32))
  per_sample = per_sample_loss(x0, d_teacher, d_fake, sigma, weight)
  chex.assert_shape(per_sample, x0.shape[:1])
  return jnp.mean(per_sample), {"x0": x0, "per_sample": per_sample}
