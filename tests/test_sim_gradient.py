"""The score-gradient theorem (SIM, Sec. 3) by finite differences, on cases whose truth is exact.

An affine Gaussian generator x0 = m + L z has diffused density q_t = N(m, L L^T + sigma^2 I), so its
exact score stands in for the fake score. The divergence

    Div(theta) = E_{x ~ sg(q_theta0)} d( D_p(x) - D_{q_theta}(x) )      (denoiser units, DESIGN.md)

is estimated on fixed samples and differentiated by central finite differences; `jax.grad` of the
Monte-Carlo SIM surrogate must match it. The wrong construction (d'(y) detached) must not.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simjax.losses import generator as generator_losses
from simjax.losses import sim
from simjax.teachers import mixture

from analytic_cases import GAUSSIAN, H, MIXTURE, N, REL_TOL, THETA0, affine_denoiser, flat, unflat


def gradients(teacher, distance, sigma, detach=False, seed=0):
  key_z, key_e = jax.random.split(jax.random.key(seed))
  z = jax.random.normal(key_z, (N, 2), jnp.float64)
  eps = jax.random.normal(key_e, (N, 2), jnp.float64)
  sig = jnp.full((N,), sigma, jnp.float64)
  d_p = lambda x: mixture.denoise(teacher, x, sig)

  # Exact divergence on fixed samples x ~ q_theta0 (the expectation's measure is under stop-gradient).
  x_fixed = THETA0["m"] + z @ THETA0["L"].T + sigma * eps
  def divergence(v):
    return jnp.mean(distance.value(d_p(x_fixed) - affine_denoiser(unflat(v), x_fixed, sigma)))
  v0 = flat(THETA0)
  basis = jnp.eye(v0.shape[0], dtype=jnp.float64)
  fd = jnp.stack([(divergence(v0 + H * e) - divergence(v0 - H * e)) / (2 * H) for e in basis])

  # SIM surrogate: samples through the generator, fake score = exact score of q_theta0 (frozen).
  def surrogate(v):
    theta = unflat(v)
    x0 = theta["m"] + z @ theta["L"].T
    x_t = x0 + sigma * eps
    per = sim.sim_surrogate(x0, d_p(x_t), affine_denoiser(THETA0, x_t, sigma), distance, normalize=False,
                            detach_distance_grad=detach)
    return jnp.mean(per)
  return np.asarray(jax.grad(surrogate)(v0)), np.asarray(fd)


def rel_err(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


CASES = [(t, d, s) for t in ("gaussian", "mixture") for d in ("l2", "pseudo_huber") for s in (0.2, 0.7, 2.0)]


@pytest.mark.parametrize("teacher_name,distance_name,sigma", CASES)
def test_sim_gradient_matches_finite_differences(teacher_name, distance_name, sigma):
  teacher = GAUSSIAN if teacher_name == "gaussian" else MIXTURE
  distance = sim.squared_l2() if distance_name == "l2" else sim.pseudo_huber(0.3)
  with jax.enable_x64(True):
    g, fd = gradients(teacher, distance, sigma)
  assert np.linalg.norm(fd) > 1e-3, "degenerate case: the divergence is flat at theta0"
  assert rel_err(g, fd) < REL_TOL, (g, fd)


@pytest.mark.parametrize("teacher_name,distance_name,sigma",
                         [("mixture", "l2", 0.7), ("mixture", "pseudo_huber", 0.7), ("gaussian", "l2", 0.7)])
def test_detached_distance_gradient_fails_the_same_check(teacher_name, distance_name, sigma):
  """The test has power: detaching d'(y_t) gives a gradient the FD check rejects."""
  teacher = GAUSSIAN if teacher_name == "gaussian" else MIXTURE
  distance = sim.squared_l2() if distance_name == "l2" else sim.pseudo_huber(0.3)
  with jax.enable_x64(True):
    g, fd = gradients(teacher, distance, sigma, detach=True)
  assert rel_err(g, fd) > 3 * REL_TOL, (g, fd)


def test_sim_l2_equals_sid_alpha_one():
  """Squared-L2 SIM's generator gradient is 2x SiD's loss (D_p - D_psi).(D_psi - x_g) at alpha = 1."""
  from simjax.networks.mlp import MLPDenoiser
  net = MLPDenoiser(data_dim=3, hidden=32, num_blocks=2, emb_features=16)
  k = jax.random.split(jax.random.key(0), 6)
  init = lambda kk: net.init(kk, jnp.zeros((1, 3)), jnp.ones((1,)))["params"]
  gen_p, fake_p, teacher_p = init(k[0]), init(k[1]), init(k[2])
  z = jax.random.normal(k[3], (64, 3))
  eps = jax.random.normal(k[4], (64, 3))
  sigma = jnp.exp(jax.random.normal(k[5], (64,)))
  d = lambda p, x, s: net.apply({"params": p}, x, s)
  generate = lambda p: d(p, 2.5 * z, jnp.full((64,), 2.5))

  def sim_loss(p):
    return generator_losses.generator_loss(p, fake_p, teacher_p, generate=generate, teacher_denoise=d, fake_denoise=d,
                                          eps=eps, sigma=sigma, per_sample_loss=generator_losses.sim_per_sample(sim.squared_l2()),
                                          normalize=True)[0]

  def sid_loss(p):  # written from SiD's paper (Zhou et al. 2024, Eq. 23 at alpha = 1)
    x_g = generate(p)
    x_t = x_g + sigma[:, None] * eps
    f_phi, f_psi = d(teacher_p, x_t, sigma), d(jax.lax.stop_gradient(fake_p), x_t, sigma)
    w = 1.0 / jax.lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(x_g - f_phi), axis=1), 1e-5))
    return jnp.mean(w * jnp.sum((f_phi - f_psi) * (f_psi - x_g), axis=1))

  g_sim, g_sid = jax.grad(sim_loss)(gen_p), jax.grad(sid_loss)(gen_p)
  for a, b in zip(jax.tree.leaves(g_sim), jax.tree.leaves(g_sid)):
    np.testing.assert_allclose(a, 2.0 * b, rtol=1e-4, atol=1e-6)
  assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g_sid)) > 1e-4


def test_fake_params_get_no_gradient():
  """The stop-gradient sits on the fake score's parameters: d/dpsi of the generator loss is zero."""
  teacher = lambda p, x, s: mixture.denoise(MIXTURE, x, s)
  fake = lambda p, x, s: x * p["a"]
  z = jax.random.normal(jax.random.key(1), (32, 2))
  eps = jax.random.normal(jax.random.key(2), (32, 2))
  sigma = jnp.full((32,), 0.5)
  def loss(psi, theta):
    return generator_losses.generator_loss(
        theta, psi, {}, generate=lambda t: t["m"] + z * t["s"], teacher_denoise=teacher, fake_denoise=fake, eps=eps,
        sigma=sigma, per_sample_loss=generator_losses.sim_per_sample(sim.pseudo_huber(0.1)))[0]
  psi, theta = {"a": jnp.array(0.7)}, {"m": jnp.array([0.1, 0.0]), "s": jnp.array(0.8)}
  assert float(jax.grad(loss)(psi, theta)["a"]) == 0.0
  assert float(jnp.abs(jax.grad(loss, argnums=1)(psi, theta)["s"])) > 0.0


def test_distance_derivatives_match_autodiff():
  y = jax.random.normal(jax.random.key(3), (5, 4))
  for dist in (sim.squared_l2(), sim.pseudo_huber(0.5)):
    auto = jax.grad(lambda v: jnp.sum(dist.value(v)))(y)
    np.testing.assert_allclose(dist.derivative(y), auto, rtol=1e-5, atol=1e-6)


def test_bad_distance_config_is_refused():
  import ml_collections
  with pytest.raises(ValueError, match="unknown distance"):
    sim.get_distance(ml_collections.ConfigDict({"distance": "l1", "huber_c": 1.0}), 4)
  with pytest.raises(ValueError, match="finite and > 0"):
    sim.pseudo_huber(0.0)
  with pytest.raises(ValueError, match="huber_c_per_dim"):
    sim.get_distance(ml_collections.ConfigDict({"distance": "pseudo_huber", "huber_c": 0.0,
                                                "huber_c_per_dim": float("nan")}), 4)


def test_huber_constant_is_per_dimension_unless_given_absolutely():
  import ml_collections
  per_dim = ml_collections.ConfigDict({"distance": "pseudo_huber", "huber_c": 0.0, "huber_c_per_dim": 0.05})
  assert sim.huber_constant(per_dim, 64) == pytest.approx(0.4)
  assert sim.huber_constant(per_dim, 3072) == pytest.approx(0.05 * 3072 ** 0.5)
  absolute = ml_collections.ConfigDict({"distance": "pseudo_huber", "huber_c": 0.7, "huber_c_per_dim": 0.05})
  assert sim.huber_constant(absolute, 64) == 0.7
  y = jnp.ones((2, 64))  # ||y|| = 8: d'(y) = y / sqrt(64 + c^2) with c = 0.4
  np.testing.assert_allclose(sim.get_distance(per_dim, 64).derivative(y), y / np.sqrt(64 + 0.16), rtol=1e-6)


def _loss_section(**values):
  """The run config's loss section as configs/common.py declares it, `values` changed."""
  from simjax import config_files  # pylint: disable=import-outside-toplevel
  from conftest import REPO  # pylint: disable=import-outside-toplevel
  cfg = config_files.load(REPO / "configs" / "common.py").shared_config("gmm").loss
  cfg.update(values)
  return cfg


def test_generator_losses_are_a_registry_selected_by_name():
  """loss.name picks the per-sample loss (default 'sim'); an unknown name is one line naming the choices;
  a registered function is all a new loss needs."""
  from simjax.errors import UserError
  cfg = _loss_section(distance="l2", huber_c=0.0, huber_c_per_dim=0.1, t_max=0.8)
  x0, a, b = (jax.random.normal(jax.random.key(i), (4, 3)) for i in range(3))
  sigma, weight = jnp.ones((4,)), jnp.full((4,), 2.0)
  sim_default = generator_losses.get_generator_loss(cfg, 3).per_sample(x0, a, b, sigma, weight)
  np.testing.assert_allclose(sim_default, 2.0 * jnp.sum(2.0 * (a - b) * (b - x0), axis=1), rtol=1e-6)
  cfg.name = "no_such_loss"
  with pytest.raises(UserError, match="loss.name to one of"):
    generator_losses.get_generator_loss(cfg, 3)
  generator_losses.register("no_such_loss")(lambda c, d: generator_losses.GeneratorLoss(
      lambda x0, a, b, s, w: w * jnp.sum((a - b) ** 2, axis=1), (0.0, 1.0)))
  try:
    got = generator_losses.get_generator_loss(cfg, 3).per_sample(x0, a, b, sigma, weight)
    np.testing.assert_allclose(got, 2.0 * jnp.sum((a - b) ** 2, axis=1), rtol=1e-6)
  finally:
    del generator_losses.LOSSES["no_such_loss"]


def test_generator_loss_checks_shapes_at_its_boundary():
  """chex at the loss boundary: noise of the wrong shape, per-sample sigma of the wrong length, and a
  per-sample loss that is not [N] are refused where they enter, not broadcast into a wrong number."""
  cfg = _loss_section(distance="l2", huber_c=0.0, huber_c_per_dim=0.1, t_max=0.8)
  per_sample = generator_losses.get_generator_loss(cfg, 3).per_sample
  x0 = jax.random.normal(jax.random.key(0), (4, 3))
  denoise = lambda p, x, s: p * x
  kwargs = dict(generate=lambda g: g * x0, per_sample_loss=per_sample, teacher_denoise=denoise,
                fake_denoise=denoise, normalize=False)
  good = generator_losses.generator_loss(1.0, 0.5, 0.9, eps=jnp.ones((4, 3)), sigma=jnp.ones((4,)), **kwargs)
  assert np.isfinite(float(good[0]))
  with pytest.raises(AssertionError):
    generator_losses.generator_loss(1.0, 0.5, 0.9, eps=jnp.ones((4, 1)), sigma=jnp.ones((4,)), **kwargs)
  with pytest.raises(AssertionError):
    generator_losses.generator_loss(1.0, 0.5, 0.9, eps=jnp.ones((4, 3)), sigma=jnp.ones((2,)), **kwargs)
  kwargs["per_sample_loss"] = lambda x0, a, b, s, w: (a - b) ** 2  # [N, D], not [N]
  with pytest.raises(AssertionError):
    generator_losses.generator_loss(1.0, 0.5, 0.9, eps=jnp.ones((4, 3)), sigma=jnp.ones((4,)), **kwargs)
