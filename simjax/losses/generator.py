"""Generator losses of score distillation as a registry, selected by `loss.name` (DESIGN.md section 1).

Every entry shares one per-sample signature in denoiser units,

    per_sample(x0, a, b, sigma, weight) -> [N],   a = D_p(x_t) (teacher), b = D_psi(x_t) (fake score),

with the fake score's parameters already stopped and `weight` [N] the per-sample normaliser (1 where
`loss.normalize` is off). `generator_loss` draws x_t = x0 + sigma eps, calls the two denoisers and
averages; gradients reach the generator through x0 and x_t. With y = a - b:

  sim            w d'(y) . (b - x0)                  SIM with distance d (losses/sim.py)
  sid            w y . ((a - x0) - alpha y)          SiD (Zhou et al. 2024, Eq. 23); alpha = 1 is SIM-L2 / 2
  diff_instruct  w sg(b - a) . x0                    Diff-Instruct's integral-KL gradient (Luo et al. 2023)
  dmd            the same with DMD's 1/mean|x0 - a|  DMD / DMD2 (Yin et al. 2024), DMD2's noise levels
  uni_instruct   w [density(r) ||y||^2 + score(r) 2 y . (b - x0)], r = q/p from the discriminator: the
                 expanded f-divergence `loss.f` (Uni-Instruct, Wang et al. 2025); per_sample takes log_ratio

Units. D = x + sigma^2 s turns scores into denoisers, so `diff_instruct`'s gradient at one noise level is
sigma^2 w dKL(q_sigma || p_sigma)/dtheta: the Diff-Instruct weighting w(sigma) / sigma^2 of the issue's
formula with w(sigma) = sigma^2 w. `sid` at a fixed fake score is the gradient of half the SIM-L2
divergence plus (1 - alpha) E_{q_theta} ||y||^2 (tests/test_loss_family.py proves both by finite
differences). A new loss is one function registered here with `register`.
"""
import math
from typing import Callable, Dict, NamedTuple, Tuple

import chex
import jax
import jax.numpy as jnp

from simjax.errors import UserError
from simjax.losses import adversarial
from simjax.losses import sim

PerSampleLoss = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


class GeneratorLoss(NamedTuple):
  """A registered loss, built: its per-sample function and the range of t its noise levels are drawn
  from (t ~ U[t_min, t_max] on the Karras ramp, diffusion/edm.sample_sigma_karras_uniform). With
  needs_ratio, per_sample takes a sixth argument, log q_sigma / p_sigma at x_t from the discriminator
  (losses/adversarial.py), which the fake-score step then trains."""
  per_sample: PerSampleLoss
  t_range: Tuple[float, float]
  needs_ratio: bool = False


# name -> (loss config, values per sample) -> GeneratorLoss
LOSSES: Dict[str, Callable[[object, int], GeneratorLoss]] = {}


def register(name: str):
  def add(factory):
    LOSSES[name] = factory
    return factory
  return add


def _t_range(loss_config, prefix=""):
  """(t_min, t_max) from `loss.<prefix>t_min` / `loss.<prefix>t_max`, checked: 0 <= t_min < t_max <= 1."""
  t_min = float(loss_config[prefix + "t_min"] or 0.0)
  t_max = float(loss_config[prefix + "t_max"])
  if not 0.0 <= t_min < t_max <= 1.0:
    raise UserError(f"loss.{prefix}t_min={t_min:g} and loss.{prefix}t_max={t_max:g} must satisfy "
                    f"0 <= t_min < t_max <= 1; set --config.loss.{prefix}t_min / --config.loss.{prefix}t_max.")
  return t_min, t_max


def sim_per_sample(distance: sim.Distance) -> PerSampleLoss:
  """SIM's surrogate weight * d'(a - b) . (b - x0) with distance d (losses/sim.py)."""
  def per_sample(x0, a, b, sigma, weight):
    del sigma  # SIM's noise-level weighting is its distance in denoiser units (losses/sim.py)
    return weight * sim.sim_surrogate(x0, a, b, distance, normalize=False)
  return per_sample


def sid_per_sample(alpha: float) -> PerSampleLoss:
  """SiD's weight * y . ((a - x0) - alpha y), y = a - b; gradients through a, b and x0 (x_t and x0)."""
  def per_sample(x0, a, b, sigma, weight):
    del sigma
    y = a - b
    return weight * sim.per_sample_dot(y, (a - x0) - alpha * y)
  return per_sample


class FDivergence(NamedTuple):
  """D_f(q || p) = E_p f(q / p) through the two weights its expanded gradient needs, as functions of log r,
  r = q_sigma / p_sigma: score(r) = r f''(r) and density(r) = d(r score(r)) / dr. uses_ratio is False where
  both are constant (reverse KL): training then needs no discriminator."""
  score: Callable[[jax.Array], jax.Array]
  density: Callable[[jax.Array], jax.Array]
  uses_ratio: bool = True


# Distillation's naming: q is the generator, p the teacher. reverse_kl is the mode-seeking KL(q || p) that
# Diff-Instruct and DMD minimise, forward_kl the mode-covering KL(p || q).
F_DIVERGENCES = {
    "reverse_kl": FDivergence(score=jnp.ones_like, density=jnp.ones_like, uses_ratio=False),  # f = r log r
    "forward_kl": FDivergence(score=lambda log_r: jnp.exp(-log_r), density=jnp.zeros_like),   # f = -log r
    "jensen_shannon": FDivergence(score=lambda log_r: 0.5 * jax.nn.sigmoid(-log_r),           # 1 / (2 (1 + r))
                                  density=lambda log_r: 0.5 * jax.nn.sigmoid(-log_r) ** 2),
}


def f_divergence_per_sample(f: FDivergence):
  """The gradient of Uni-Instruct's expansion of D_f at one noise level (Wang et al. 2025, arXiv 2505.20755).

  Along the diffusion, D_f(q_0 || p_0) = int sigma F_sigma dsigma with
  F_sigma(theta) = E_{x ~ q_theta,sigma}[ r f''(r) ||s_q(x) - s_p(x)||^2 ] (from d/dsigma D_f(q_sigma || p_sigma)
  and the heat equation). Its gradient, with the score s_q and the ratio r of q_theta itself (not held), splits
  into two branches, each a fixed function of x_t differentiated through x_t alone:
    - the score branch, SIM-L2's surrogate weighted by r f''(r): through s_q's dependence on theta, by SIM's
      score-projection identity;
    - the density branch, (r^2 f''(r))' ||y||^2: through the measure q_theta and the ratio's dependence on it.
  In denoiser units (times sigma^4, as SIM's surrogate):
      w [ density(r) ||a - b||^2 + score(r) 2 (a - b) . (b - x0) ].
  reverse_kl's density weight is 1 (it is 2 * sid at alpha = 1/2); forward_kl's is 0 (SIM-L2's branch alone,
  weighted by p / q). `log_ratio` [N] is log q_sigma(x_t) - log p_sigma(x_t) *as a function of x_t*: the
  gradient must reach the generator through it, so a stopped ratio is wrong (tests/test_loss_family.py).
  """
  def per_sample(x0, a, b, sigma, weight, log_ratio):
    del sigma
    y = a - b
    return weight * (f.density(log_ratio) * sim.per_sample_dot(y, y)
                     + f.score(log_ratio) * 2.0 * sim.per_sample_dot(y, b - x0))
  return per_sample


def diff_instruct_per_sample(x0, a, b, sigma, weight):
  """weight * sg(b - a) . x0: the gradient reaches the generator through x0 alone (no network Jacobians)."""
  del sigma
  return weight * sim.per_sample_dot(jax.lax.stop_gradient(b - a), x0)


@register("sim")
def _sim(loss_config, data_dim: int) -> GeneratorLoss:
  return GeneratorLoss(sim_per_sample(sim.get_distance(loss_config, data_dim)), _t_range(loss_config))


@register("sid")
def _sid(loss_config, data_dim: int) -> GeneratorLoss:
  del data_dim
  alpha = float(loss_config.alpha)
  if not math.isfinite(alpha):
    raise UserError(f"loss.alpha must be a finite number, got {loss_config.alpha}; set --config.loss.alpha "
                    "(SiD's default 1.2; 1 is SIM-L2).")
  return GeneratorLoss(sid_per_sample(alpha), _t_range(loss_config))


@register("diff_instruct")
def _diff_instruct(loss_config, data_dim: int) -> GeneratorLoss:
  del data_dim
  return GeneratorLoss(diff_instruct_per_sample, _t_range(loss_config))


@register("dmd")
def _dmd(loss_config, data_dim: int) -> GeneratorLoss:
  """DMD's distribution-matching gradient: Diff-Instruct's direction with DMD's normaliser, which is part of
  the method (so `loss.normalize` must stay on), at DMD2's noise levels: DMD2 draws Karras-grid indices
  20..980 of 1000 (min/max_step_percent 0.02/0.98), here t ~ U[loss.dmd_t_min, loss.dmd_t_max]."""
  del data_dim
  if not loss_config.normalize:
    raise UserError("loss.name='dmd' is defined with its per-sample normaliser 1/mean|x0 - D_p|; set "
                    "--config.loss.normalize=True, or use --config.loss.name=diff_instruct for the unnormalised form.")
  return GeneratorLoss(diff_instruct_per_sample, _t_range(loss_config, "dmd_"))


@register("uni_instruct")
def _uni_instruct(loss_config, data_dim: int) -> GeneratorLoss:
  """Uni-Instruct's expanded f-divergence `loss.f`, its density ratio from the fake score's discriminator (none
  for reverse KL, whose weights are constant: it is 2 x sid at alpha 1/2, and a discriminator sharing the fake
  score's parameters would only perturb its DSM)."""
  del data_dim
  name = loss_config.f
  if name not in F_DIVERGENCES:
    raise UserError(f"unknown f-divergence loss.f={name!r}; set --config.loss.f to one of {sorted(F_DIVERGENCES)}.")
  f = F_DIVERGENCES[name]
  if not f.uses_ratio:
    per_sample = f_divergence_per_sample(f)
    return GeneratorLoss(lambda x0, a, b, sigma, weight: per_sample(x0, a, b, sigma, weight, jnp.zeros_like(weight)),
                         _t_range(loss_config))
  return GeneratorLoss(f_divergence_per_sample(f), _t_range(loss_config), needs_ratio=True)


def get_generator_loss(loss_config, data_dim: int) -> GeneratorLoss:
  """The registered loss `loss_config.name` for samples of `data_dim` values."""
  name = loss_config.name
  if name not in LOSSES:
    raise UserError(f"unknown generator loss {name!r}; set --config.loss.name to one of {sorted(LOSSES)}.")
  return LOSSES[name](loss_config, data_dim)


def generator_loss(gen_params, fake_params, teacher_params, *, generate, per_sample_loss: PerSampleLoss, eps, sigma,
                   teacher_denoise=None, fake_denoise=None, denoise_pair=None, normalize: bool = True,
                   normalize_floor: float = 1e-5, needs_ratio: bool = False, sample_weight=None):
  """Mean generator loss over a batch; `jax.grad` of it w.r.t. gen_params is the generator's gradient.

  Args:
    gen_params: generator parameters (differentiated).
    fake_params: fake-score parameters; stop-gradient is applied here, and only here.
    teacher_params: frozen teacher parameters.
    generate: gen_params -> x0 [N, ...] (the generator's one-step samples, its noise closed over).
    per_sample_loss: an entry of LOSSES, built.
    teacher_denoise, fake_denoise: (params, x_t, sigma) -> D(x_t, sigma); fake_denoise may return
      (D, discriminator logits) instead (losses/adversarial.py), which aux then holds.
    denoise_pair: instead of the two, (teacher_params, fake_params, x_t, sigma) -> (D_teacher, D_fake)
      from one call (both see the same x_t).
    eps: diffusion noise, x0's shape; sigma: per-sample noise levels [N].
    normalize: weight each sample by DMD/SiD's 1 / sg(mean |x0 - D_p(x_t)|) (losses/sim.py).
    needs_ratio: the loss takes log q/p at x_t (GeneratorLoss.needs_ratio), from the fake's logits.
    sample_weight: [N] factors of the per-sample weight (stop-gradient), e.g. SiD's e^-u of EDM2's uncertainty.
  Returns:
    (loss, aux) with aux holding x0, the per-sample loss and weight, and the logits where given.
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
  d_fake, logits = d_fake if isinstance(d_fake, tuple) else (d_fake, None)
  chex.assert_equal_shape([x0, d_teacher, d_fake])
  weight = (sim.dmd_normalizer(x0, d_teacher, normalize_floor) if normalize
            else jnp.ones(x0.shape[:1], jnp.float32))
  if sample_weight is not None:
    chex.assert_shape(sample_weight, x0.shape[:1])
    weight = weight * jax.lax.stop_gradient(sample_weight)
  if needs_ratio:
    if logits is None:
      raise ValueError("this loss needs the density ratio: fake_denoise must return (D, discriminator logits).")
    per_sample = per_sample_loss(x0, d_teacher, d_fake, sigma, weight, adversarial.log_ratio(logits))
  else:
    per_sample = per_sample_loss(x0, d_teacher, d_fake, sigma, weight)
  chex.assert_shape(per_sample, x0.shape[:1])
  aux = {"x0": x0, "per_sample": per_sample, "weight": weight}
  if logits is not None:
    aux["logits"] = logits
  return jnp.mean(per_sample), aux
