"""loss.logvar_weighting (SiD's --return_logvar for EDM2 networks): the fake score's uncertainty u(sigma)
weights its DSM as EDM2 trains and divides the generator's per-sample loss by e^u."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simjax.losses import dsm
from simjax.losses import generator as generator_losses
from simjax.networks.precond import EDM2Precond, build_precond, init_params
from simjax.training.roles import Denoiser

ARCH = dict(precond="EDM2Precond", img_resolution=8, img_channels=2, label_dim=3, model_channels=8,
            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)


def test_the_uncertainty_head_alone_is_what_the_network_returns():
  """Denoiser.logvar reads u(sigma) from the params without the U-Net pass, equal to the network's own output."""
  module = build_precond(ARCH)
  assert isinstance(module, EDM2Precond) and Denoiser(module).has_logvar
  variables = jax.jit(lambda key: init_params(module, key))(jax.random.key(0))
  sigma = jnp.array([0.002, 0.3, 2.0, 80.0])
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 2))
  _, logvar = jax.jit(lambda v: module.apply(v, x, sigma, None, return_logvar=True))(variables)
  u = Denoiser(module).logvar(variables["params"], sigma)
  assert u.shape == (4,) and np.ptp(np.asarray(u)) > 1e-3  # a function of sigma, not a constant
  np.testing.assert_allclose(np.asarray(u), np.asarray(logvar).reshape(-1), rtol=1e-6, atol=1e-7)
  # A SongUNet fake score has no head.
  assert not Denoiser(build_precond(dict(model_type="SongUNet", img_resolution=8, img_channels=1, model_channels=16,
                                         channel_mult=[1], num_blocks=1, attn_resolutions=[]))).has_logvar


def _objective_gradient_in_u(objective, per_sample, u):
  return np.asarray(jax.grad(lambda v: jnp.sum(objective(per_sample, v)))(u))


def test_the_weighted_dsm_learns_the_per_element_loss_and_a_wrong_form_does_not():
  """EDM2 adds u per element of a loss summed over data_dim elements, so for a fixed loss the minimising u is
  log(loss / data_dim), the per-element loss; checked by the gradient there (zero) and by finite differences
  elsewhere. The form without data_dim (EDM2's per-element formula put on a summed loss) misses it."""
  data_dim = 128
  per_sample = jnp.array([3.0, 40.0, 512.0])
  optimum = jnp.log(per_sample / data_dim)
  ours = lambda l, u: dsm.uncertainty_weighted(l, u, data_dim)
  np.testing.assert_allclose(_objective_gradient_in_u(ours, per_sample, optimum), 0.0, atol=1e-3)
  u, h = optimum + 0.7, 1e-2
  fd = (np.asarray(ours(per_sample, u + h)) - np.asarray(ours(per_sample, u - h))) / (2 * h)
  np.testing.assert_allclose(_objective_gradient_in_u(ours, per_sample, u), fd, rtol=1e-3)
  wrong = lambda l, u: l * jnp.exp(-u) + u
  assert np.abs(_objective_gradient_in_u(wrong, per_sample, optimum)).min() > 10.0


def _loss_config():
  return ml_collections.ConfigDict(dict(name="sim", distance="l2", normalize=True, normalize_floor=1e-5, t_max=0.8,
                                        t_min=0.0, huber_c_per_dim=0.3, huber_c=0.0))


def test_the_generator_loss_divides_each_samples_term_by_e_to_the_u():
  """generator_loss(sample_weight=e^-u): value and gradient are those of mean_i e^-u_i loss_i, and the weights
  get no gradient (they are the frozen fake score's)."""
  entry = generator_losses.get_generator_loss(_loss_config(), 2)
  key = jax.random.key(3)
  theta = jax.random.normal(key, (6, 2))
  eps = jax.random.normal(jax.random.fold_in(key, 1), (6, 2))
  sigma = jnp.linspace(0.1, 3.0, 6)
  u = jnp.linspace(-1.0, 1.5, 6)

  def loss(params, sample_weight):
    value, aux = generator_losses.generator_loss(
        params, None, None, generate=lambda p: p, per_sample_loss=entry.per_sample, eps=eps, sigma=sigma,
        teacher_denoise=lambda _, x, s: 0.5 * x, fake_denoise=lambda _, x, s: 0.3 * x + 0.1,
        sample_weight=sample_weight)
    return value, aux

  (plain, aux), g_plain = jax.value_and_grad(loss, has_aux=True)(theta, None)
  (weighted, _), g_weighted = jax.value_and_grad(loss, has_aux=True)(theta, jnp.exp(-u))
  np.testing.assert_allclose(weighted, jnp.mean(jnp.exp(-u) * aux["per_sample"]), rtol=1e-5)
  # Row i's gradient comes from sample i alone (x0 = theta), so the weight scales it exactly.
  np.testing.assert_allclose(g_weighted, np.exp(-np.asarray(u))[:, None] * np.asarray(g_plain), rtol=1e-5)
  assert not np.allclose(weighted, plain)
  g_u = jax.grad(lambda w: loss(theta, w)[0])(jnp.exp(-u))
  np.testing.assert_array_equal(np.asarray(g_u), 0.0)
