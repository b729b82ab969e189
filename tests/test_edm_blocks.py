"""EDM building blocks: preconditioning, noise levels, samplers, DSM toward a known score."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simjax.diffusion import edm, samplers
from simjax.losses import dsm
from simjax.networks.mlp import MLPDenoiser


def test_edm_preconditioning_by_hand():
  sigma, sd = 1.5, 0.5
  pc = edm.edm_precondition(jnp.float32(sigma), sd)
  assert math.isclose(float(pc.c_skip), 0.25 / (2.25 + 0.25), rel_tol=1e-6)
  assert math.isclose(float(pc.c_out), 1.5 * 0.5 / math.sqrt(2.5), rel_tol=1e-6)
  assert math.isclose(float(pc.c_in), 1 / math.sqrt(2.5), rel_tol=1e-6)
  assert math.isclose(float(pc.c_noise), math.log(1.5) / 4, rel_tol=1e-6)
  # D = c_skip x + c_out F is the minimum-variance mix (Karras et al. Eq. 7): c_skip + c_out^2/sd^2... = 1.
  assert math.isclose(float(pc.c_skip + pc.c_out**2 / sd**2 * (sd**2 / (sigma**2 + sd**2)) * (sigma**2 + sd**2) / sd**2
                            - pc.c_out**2 / sd**2), float(pc.c_skip), rel_tol=1e-6)
  assert math.isclose(float(edm.edm_loss_weight(jnp.float32(sigma), sd)), (2.25 + 0.25) / (0.75**2), rel_tol=1e-6)


def test_karras_grid():
  s = edm.karras_sigmas(18)
  assert s.shape == (19,)
  assert math.isclose(float(s[0]), 80.0, rel_tol=1e-5)
  assert math.isclose(float(s[17]), 0.002, rel_tol=1e-4)
  assert float(s[18]) == 0.0
  assert bool(jnp.all(jnp.diff(s) < 0))
  with pytest.raises(ValueError, match="num_steps"):
    edm.karras_sigmas(0)


def test_noise_level_samplers():
  key = jax.random.key(0)
  ln = jnp.log(edm.sample_sigma_lognormal(key, (200_000,)))
  assert abs(float(ln.mean()) + 1.2) < 0.02 and abs(float(ln.std()) - 1.2) < 0.02
  # SiD's direction: t = 0 is sigma_min, t_max = 0.8 caps the largest level at ~24.4, median ~1.
  s = np.asarray(edm.sample_sigma_karras_uniform(key, (100_000,), t_max=0.8))
  top = float(edm.karras_sigma(0.2))
  assert math.isclose(top, 24.4, rel_tol=2e-3)
  assert float(s.min()) >= 0.002 - 1e-7 and float(s.max()) <= top * (1 + 1e-5)
  assert float(s.min()) < 0.0025 and float(s.max()) > 0.99 * top  # both ends are reached
  assert 0.8 < float(np.median(s)) < 1.25
  # The median is the level at t = t_max / 2 on the rho-grid, read from the low end.
  assert math.isclose(float(np.median(s)), float(edm.karras_sigma(1 - 0.4)), rel_tol=0.02)


def test_heun_nfe_and_determinism():
  calls = []
  def denoise(x, s):
    calls.append(1)
    return x * 0.5
  z = jnp.ones((4, 2))
  samplers.heun_sample(denoise, z)  # traced once per distinct call site
  assert samplers.num_function_evals(18) == 35
  assert samplers.num_function_evals(18, "euler") == 18
  f = jax.jit(lambda z: samplers.heun_sample(lambda x, s: x / (1 + s[:, None] ** 2), z))
  np.testing.assert_array_equal(f(z), f(z))


def test_stochastic_sampler_needs_key_and_is_seeded():
  d = lambda x, s: x / (1 + s[:, None] ** 2)
  z = jnp.ones((4, 2))
  with pytest.raises(ValueError, match="key"):
    samplers.edm_sample(d, z, s_churn=10.0)
  a = samplers.edm_sample(d, z, s_churn=10.0, s_max=50.0, key=jax.random.key(1))
  b = samplers.edm_sample(d, z, s_churn=10.0, s_max=50.0, key=jax.random.key(1))
  c = samplers.edm_sample(d, z, s_churn=10.0, s_max=50.0, key=jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_dsm_drives_fake_score_toward_exact_gaussian_score():
  """DSM on samples of N(mu, diag(std^2)) learns its exact score over sigma in [0.1, 5], the middle
  of the levels SIM's generator loss draws ([0.002, 24.4], median ~1)."""
  mu, std = jnp.array([0.4, -0.3]), jnp.array([0.3, 0.6])
  net = MLPDenoiser(data_dim=2, hidden=64, num_blocks=2, emb_features=32)
  params = net.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.ones((1,)))["params"]
  opt = optax.adam(1e-3)
  denoise = lambda p, x, s: net.apply({"params": p}, x, s)

  def exact(x, s):  # E[x0 | x_t] for x0 ~ N(mu, diag(std^2))
    v = std**2
    return mu + v / (v + s[:, None] ** 2) * (x - mu)

  def score_rel_err(p):
    """RMS over samples of |s_net - s_exact| / |s_exact| (the sigma^2 of the scores cancels)."""
    k = jax.random.key(99)
    s = jnp.exp(jnp.linspace(jnp.log(0.1), jnp.log(5.0), 512))
    x = mu + std * jax.random.normal(k, (512, 2)) + s[:, None] * jax.random.normal(jax.random.fold_in(k, 1), (512, 2))
    err = jnp.sum((denoise(p, x, s) - exact(x, s)) ** 2, 1)
    ref = jnp.sum((exact(x, s) - x) ** 2, 1)
    return float(jnp.sqrt(jnp.mean(err / ref)))

  @jax.jit
  def step(p, o, k):
    k1, k2 = jax.random.split(k)
    x0 = mu + std * jax.random.normal(k1, (512, 2))
    sigma, eps = dsm.draw_dsm_noise(k2, x0.shape)
    loss, g = jax.value_and_grad(dsm.dsm_loss)(p, denoise, x0, sigma, eps)
    u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  before = score_rel_err(params)
  o = opt.init(params)
  for i in range(1500):
    params, o, _ = step(params, o, jax.random.key(i))
  after = score_rel_err(params)
  assert after < 0.12, (before, after)   # measured 0.076 (from 1.50)
  assert after < 0.1 * before, (before, after)
