"""The generator losses beyond SIM (losses/generator.py), each proven by finite differences of the
closed-form objective whose gradient it is, with a wrong construction shown to fail the same check.

Cases are those of test_sim_gradient.py (analytic_cases.py): an affine Gaussian generator whose exact
diffused denoiser stands in for the fake score (held at theta0), with a Gaussian and a mixture teacher.
Every loss goes through its registry entry, with the per-sample weight 1 (`loss.normalize` off).

  sid            grad E[y . ((a - x0) - alpha y)]
                   = grad [ Div_L2(theta) / 2 + (1 - alpha) E_{x ~ q_theta} ||D_p(x) - D_{q_theta0}(x)||^2 ]
  diff_instruct  grad E[sg(b - a) . x0] = sigma^2 grad KL(q_theta,sigma || p_sigma)
  dmd            grad E[w sg(b - a) . x0] = sigma^2 grad E_i[w_i (log q_theta0 - log p)(x_t,i(theta))], w = DMD's
                   1 / mean|x0 - a| and q held at theta0 (an identity: no Monte-Carlo error, only FD's)
  f-divergences  grad E[density(r) ||y||^2 + score(r) 2 y . (b - x0)]
                   = grad E_{x ~ q_theta}[ r f''(r) ||D_{q_theta}(x) - D_p(x)||^2 ]  (Uni-Instruct's expansion at
                 one noise level, with the generator's own denoiser and ratio moving with theta)
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from simjax.diffusion import edm
from simjax.losses import generator as generator_losses
from simjax.teachers import mixture

from analytic_cases import GAUSSIAN, H, MIXTURE, N, REL_TOL, THETA0, affine_denoiser, flat, unflat

SIGMAS = (0.2, 0.7, 2.0)
TEACHERS = {"gaussian": GAUSSIAN, "mixture": MIXTURE}


def loss_config(**overrides):
  cfg = ml_collections.ConfigDict({"name": "sim", "distance": "l2", "huber_c": 0.0, "huber_c_per_dim": 0.1,
                                   "normalize": True, "t_min": 0.0, "t_max": 0.8, "alpha": 1.2,
                                   "dmd_t_min": 0.02, "dmd_t_max": 0.98})
  cfg.update(overrides)
  return cfg


def registered(name, **overrides):
  return generator_losses.get_generator_loss(loss_config(name=name, **overrides), 2).per_sample


def draws(seed=0):
  key_z, key_e = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(key_z, (N, 2), jnp.float64), jax.random.normal(key_e, (N, 2), jnp.float64))


def generated(v, z, eps, sigma):
  """(x0, x_t) of the affine generator with flat parameters v."""
  theta = unflat(v)
  x0 = theta["m"] + z @ theta["L"].T
  return x0, x0 + sigma * eps


def surrogate_gradient(per_sample, teacher, sigma, z, eps):
  """jax.grad at theta0 of the Monte-Carlo mean of `per_sample`, fake score = exact D of q_theta0 (frozen)."""
  sig = jnp.full((N,), sigma, jnp.float64)
  def surrogate(v):
    x0, x_t = generated(v, z, eps, sigma)
    a = mixture.denoise(teacher, x_t, sig)
    b = affine_denoiser(THETA0, x_t, sigma)
    return jnp.mean(per_sample(x0, a, b, sig, jnp.ones((N,), jnp.float64)))
  return np.asarray(jax.grad(surrogate)(flat(THETA0)))


def finite_differences(objective):
  v0 = flat(THETA0)
  basis = jnp.eye(v0.shape[0], dtype=jnp.float64)
  return np.asarray(jnp.stack([(objective(v0 + H * e) - objective(v0 - H * e)) / (2 * H) for e in basis]))


def rel_err(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def sid_objective(teacher, sigma, alpha, z, eps):
  """Half the SIM-L2 divergence (fixed samples of q_theta0, moving fake) plus (1 - alpha) E_{q_theta} ||y||^2
  (moving samples, fake held at theta0)."""
  sig = jnp.full((N,), sigma, jnp.float64)
  _, x_fixed = generated(flat(THETA0), z, eps, sigma)
  d_fixed = mixture.denoise(teacher, x_fixed, sig)
  def objective(v):
    div = jnp.mean(jnp.sum((d_fixed - affine_denoiser(unflat(v), x_fixed, sigma)) ** 2, axis=1))
    _, x_t = generated(v, z, eps, sigma)
    moving = jnp.mean(jnp.sum((mixture.denoise(teacher, x_t, sig) - affine_denoiser(THETA0, x_t, sigma)) ** 2, axis=1))
    return 0.5 * div + (1.0 - alpha) * moving
  return objective


def gaussian_kl(mean0, cov0, mean1, cov1):
  """KL(N(mean0, cov0) || N(mean1, cov1)), closed form."""
  inv1 = jnp.linalg.inv(cov1)
  diff = mean1 - mean0
  return 0.5 * (jnp.trace(inv1 @ cov0) + diff @ inv1 @ diff - mean0.shape[0]
                + jnp.linalg.slogdet(cov1)[1] - jnp.linalg.slogdet(cov0)[1])


def kl_objective(teacher, sigma, z, eps):
  """sigma^2 KL(q_theta,sigma || p_sigma): closed form for the Gaussian teacher; for the mixture, the
  Monte-Carlo E_{q_theta}[log q_theta - log p] on reparameterised samples (both densities exact)."""
  sig = jnp.full((N,), sigma, jnp.float64)
  def objective(v):
    theta = unflat(v)
    cov_q = theta["L"] @ theta["L"].T + sigma**2 * jnp.eye(2)
    if teacher is GAUSSIAN:
      cov_p = jnp.diag(teacher.stds[0] ** 2 + sigma**2)
      return sigma**2 * gaussian_kl(theta["m"], cov_q, teacher.means[0], cov_p)
    _, x_t = generated(v, z, eps, sigma)
    r = x_t - theta["m"]
    log_q = (-0.5 * jnp.sum(r * jnp.linalg.solve(cov_q, r.T).T, axis=1)
             - 0.5 * jnp.linalg.slogdet(cov_q)[1] - jnp.log(2 * jnp.pi))
    return sigma**2 * jnp.mean(log_q - mixture.log_density(teacher, x_t, sig))
  return objective


def log_q_affine(theta, x, sigma):
  """log N(x; m, L L^T + sigma^2 I), the affine generator's exact diffused density."""
  cov = theta["L"] @ theta["L"].T + sigma**2 * jnp.eye(2)
  r = x - theta["m"]
  return (-0.5 * jnp.sum(r * jnp.linalg.solve(cov, r.T).T, axis=1) - 0.5 * jnp.linalg.slogdet(cov)[1]
          - jnp.log(2 * jnp.pi))


def f_expansion_objective(f, teacher, sigma, z, eps):
  """sigma^4 F_sigma(theta) = E_{q_theta}[r f''(r) ||D_q_theta - D_p||^2] on reparameterised samples, every
  density, ratio and denoiser exact and moving with theta."""
  sig = jnp.full((N,), sigma, jnp.float64)
  def objective(v):
    theta = unflat(v)
    _, x_t = generated(v, z, eps, sigma)
    log_r = log_q_affine(theta, x_t, sigma) - mixture.log_density(teacher, x_t, sig)
    d = affine_denoiser(theta, x_t, sigma) - mixture.denoise(teacher, x_t, sig)
    return jnp.mean(f.score(log_r) * jnp.sum(d * d, axis=1))
  return objective


def f_surrogate_gradient(f, teacher, sigma, z, eps, *, stop_ratio=False):
  """jax.grad at theta0 of the f-divergence surrogate; the fake score is the exact D of q_theta0 and the
  ratio the exact log q_theta0 - log p, both frozen functions evaluated at the moving x_t."""
  sig = jnp.full((N,), sigma, jnp.float64)
  per_sample = generator_losses.f_divergence_per_sample(f)
  def surrogate(v):
    x0, x_t = generated(v, z, eps, sigma)
    log_r = log_q_affine(THETA0, x_t, sigma) - mixture.log_density(teacher, x_t, sig)
    if stop_ratio:
      log_r = jax.lax.stop_gradient(log_r)
    return jnp.mean(per_sample(x0, mixture.denoise(teacher, x_t, sig), affine_denoiser(THETA0, x_t, sigma), sig,
                               jnp.ones((N,), jnp.float64), log_r))
  return np.asarray(jax.grad(surrogate)(flat(THETA0)))


# Wrong constructions: each is a plausible slip the finite-difference check must catch.
def sid_with_y_detached(alpha):
  """SiD with y = a - b under stop-gradient (only a and x0 carry the generator's gradient)."""
  def per_sample(x0, a, b, sigma, weight):
    y = jax.lax.stop_gradient(a - b)
    return weight * jnp.sum(y * ((a - x0) - alpha * y), axis=1)
  return per_sample


def diff_instruct_without_stop_gradient(x0, a, b, sigma, weight):
  """(b - a) . x0 without sg: the networks' Jacobians leak into the gradient."""
  return weight * jnp.sum((b - a) * x0, axis=1)


@pytest.mark.parametrize("alpha", (1.0, 1.2))
@pytest.mark.parametrize("teacher_name", sorted(TEACHERS))
@pytest.mark.parametrize("sigma", SIGMAS)
def test_sid_gradient_matches_finite_differences(alpha, teacher_name, sigma):
  teacher = TEACHERS[teacher_name]
  with jax.enable_x64(True):
    z, eps = draws()
    g = surrogate_gradient(registered("sid", alpha=alpha), teacher, sigma, z, eps)
    fd = finite_differences(sid_objective(teacher, sigma, alpha, z, eps))
  assert np.linalg.norm(fd) > 1e-3, "degenerate case: the objective is flat at theta0"
  assert rel_err(g, fd) < REL_TOL, (g, fd)


@pytest.mark.parametrize("alpha", (1.0, 1.2))
def test_sid_with_y_detached_fails_the_same_check(alpha):
  with jax.enable_x64(True):
    z, eps = draws()
    g = surrogate_gradient(sid_with_y_detached(alpha), MIXTURE, 0.7, z, eps)
    fd = finite_differences(sid_objective(MIXTURE, 0.7, alpha, z, eps))
  assert rel_err(g, fd) > 3 * REL_TOL, (g, fd)


def weighted_ratio_objective(teacher, sigma, z, eps, weight):
  """sigma^2 mean_i w_i [log q_theta0(x_t,i) - log p(x_t,i)] on the moving samples x_t,i(theta): every density
  exact, q and the weights frozen at theta0 (as the fake score and DMD's stop-gradient normaliser are). Its
  gradient is mean_i w_i (D_q - D_p)(x_t,i) . dx0_i/dtheta, since sigma^2 grad_x log q = D_q - x."""
  sig = jnp.full((N,), sigma, jnp.float64)
  def objective(v):
    _, x_t = generated(v, z, eps, sigma)
    return sigma**2 * jnp.mean(weight * (log_q_affine(THETA0, x_t, sigma) - mixture.log_density(teacher, x_t, sig)))
  return objective


def dmd_surrogate_gradient(teacher, sigma, z, eps, *, stop_normalizer=True):
  """jax.grad at theta0 of the registered dmd loss with the normaliser generator_loss supplies (DMD's 1 /
  sg(mean|x0 - D_p|)); stop_normalizer=False is the wrong construction, the normaliser left differentiable."""
  from simjax.losses import sim  # pylint: disable=import-outside-toplevel
  sig = jnp.full((N,), sigma, jnp.float64)
  dmd = registered("dmd")
  def surrogate(v):
    x0, x_t = generated(v, z, eps, sigma)
    a = mixture.denoise(teacher, x_t, sig)
    w = sim.dmd_normalizer(x0, a) if stop_normalizer else 1.0 / jnp.mean(jnp.abs(x0 - a), axis=1)
    return jnp.mean(dmd(x0, a, affine_denoiser(THETA0, x_t, sigma), sig, w))
  return np.asarray(jax.grad(surrogate)(flat(THETA0)))


def dmd_weights_at_theta0(teacher, sigma, z, eps):
  from simjax.losses import sim  # pylint: disable=import-outside-toplevel
  x0, x_t = generated(flat(THETA0), z, eps, sigma)
  return sim.dmd_normalizer(x0, mixture.denoise(teacher, x_t, jnp.full((N,), sigma, jnp.float64)))


def diff_instruct_check(teacher, sigma, z, eps, wrong=False):
  """(gradient, finite differences) of diff_instruct against the closed-form integral KL; wrong=True: no sg."""
  loss = diff_instruct_without_stop_gradient if wrong else registered("diff_instruct")
  return (surrogate_gradient(loss, teacher, sigma, z, eps),
          finite_differences(kl_objective(teacher, sigma, z, eps)))


def dmd_check(teacher, sigma, z, eps, wrong=False):
  """(gradient, finite differences) of dmd against the weighted density ratio; wrong=True: the normaliser
  left differentiable."""
  weight = dmd_weights_at_theta0(teacher, sigma, z, eps)
  return (dmd_surrogate_gradient(teacher, sigma, z, eps, stop_normalizer=not wrong),
          finite_differences(weighted_ratio_objective(teacher, sigma, z, eps, weight)))


# The density-ratio losses: each checked against its closed-form objective, each with its wrong construction.
RATIO_CHECKS = {"diff_instruct": diff_instruct_check, "dmd": dmd_check}


@pytest.mark.parametrize("loss", sorted(RATIO_CHECKS))
@pytest.mark.parametrize("teacher_name", sorted(TEACHERS))
@pytest.mark.parametrize("sigma", SIGMAS)
def test_density_ratio_loss_gradient_matches_finite_differences(loss, teacher_name, sigma):
  with jax.enable_x64(True):
    z, eps = draws()
    g, fd = RATIO_CHECKS[loss](TEACHERS[teacher_name], sigma, z, eps)
  assert np.linalg.norm(fd) > 1e-3, "degenerate case: the objective is flat at theta0"
  assert rel_err(g, fd) < REL_TOL, (g, fd)


@pytest.mark.parametrize("loss", sorted(RATIO_CHECKS))
@pytest.mark.parametrize("teacher_name", sorted(TEACHERS))
def test_density_ratio_loss_wrong_construction_fails_the_same_check(loss, teacher_name):
  with jax.enable_x64(True):
    z, eps = draws()
    g, fd = RATIO_CHECKS[loss](TEACHERS[teacher_name], 0.7, z, eps, wrong=True)
  assert rel_err(g, fd) > 3 * REL_TOL, (g, fd)


def _random_batch(n=64, dim=5):
  keys = jax.random.split(jax.random.key(3), 4)
  x0 = jax.random.normal(keys[0], (n, dim))
  a = x0 + 0.3 * jax.random.normal(keys[1], (n, dim))
  b = x0 + 0.3 * jax.random.normal(keys[2], (n, dim))
  return x0, a, b, jnp.exp(jax.random.normal(keys[3], (n,)))


def test_dmd_is_dmd2s_own_form_with_its_normaliser():
  """DMD2 writes the generator loss as 0.5 mse(x0, sg(x0 - g)), g = (p_real - p_fake) / mean|p_real| with
  p = x0 - D: its gradient, times the D values of a sample its mean runs over, is dmd's (whose normaliser
  generator_loss supplies). A normaliser left differentiable is a different gradient."""
  from simjax.losses import sim  # pylint: disable=import-outside-toplevel
  x0, a, b, sigma = _random_batch()
  n, dim = x0.shape
  dmd = registered("dmd")
  def ours(x):
    return jnp.mean(dmd(x, a, b, sigma, sim.dmd_normalizer(x, a)))
  def dmd2(x):
    p_real, p_fake = x - a, x - b
    g = (p_real - p_fake) / jnp.mean(jnp.abs(p_real), axis=1, keepdims=True)
    return 0.5 * jnp.mean((x - jax.lax.stop_gradient(x - g)) ** 2)
  def leaky(x):  # the normaliser not stopped
    w = 1.0 / jnp.mean(jnp.abs(x - a), axis=1)
    return jnp.mean(w * jnp.sum(jax.lax.stop_gradient(b - a) * x, axis=1))
  g_ours, g_dmd2 = jax.grad(ours)(x0), jax.grad(dmd2)(x0)
  np.testing.assert_allclose(g_ours, dim * g_dmd2, rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(g_dmd2).max()) > 1e-4
  assert rel_err(np.asarray(jax.grad(leaky)(x0)), np.asarray(g_ours)) > 0.1
  # dmd and diff_instruct share the direction: with the same weight they are one function.
  w = sim.dmd_normalizer(x0, a)
  np.testing.assert_allclose(dmd(x0, a, b, sigma, w), registered("diff_instruct")(x0, a, b, sigma, w), rtol=1e-6)
  del n


def test_sid_at_alpha_one_is_half_sim_l2_and_alpha_adds_the_squared_difference():
  x0, a, b, sigma = _random_batch()
  w = jnp.linspace(0.5, 2.0, x0.shape[0])
  sim_l2 = registered("sim", distance="l2")(x0, a, b, sigma, w)
  np.testing.assert_allclose(registered("sid", alpha=1.0)(x0, a, b, sigma, w), 0.5 * sim_l2, rtol=1e-5, atol=1e-6)
  extra = registered("sid", alpha=1.2)(x0, a, b, sigma, w) - registered("sid", alpha=1.0)(x0, a, b, sigma, w)
  np.testing.assert_allclose(extra, -0.2 * w * jnp.sum((a - b) ** 2, axis=1), rtol=1e-4, atol=1e-6)


def test_each_loss_draws_its_own_noise_levels():
  """sim/sid/diff_instruct: t ~ U[t_min, t_max] (SiD's sigma in [0.002, 24.4] at t_max 0.8); dmd: DMD2's
  Karras-grid indices 20..980 of 1000, sigma in [0.0032, 71.7]."""
  key = jax.random.key(0)
  for name, (lo, hi) in (("sim", (0.002, 24.4)), ("sid", (0.002, 24.4)), ("diff_instruct", (0.002, 24.4)),
                         ("dmd", (0.00323, 71.66))):
    t_min, t_max = generator_losses.get_generator_loss(loss_config(name=name), 2).t_range
    s = np.asarray(edm.sample_sigma_karras_uniform(key, (50_000,), t_max, t_min=t_min))
    assert lo * 0.98 <= s.min() < lo * 1.15 and hi / 1.15 < s.max() <= hi * 1.02, (name, s.min(), s.max())
  with pytest.raises(ValueError, match="0 <= t_min < t_max <= 1"):
    generator_losses.get_generator_loss(loss_config(t_min=0.8), 2)


# sigma = 0.2 is left out: there the weights p/q (forward_kl) and 1/(1 + r) have heavy tails under q and the
# Monte-Carlo gradient's own error at N samples reaches 0.1-0.2 (measured), past REL_TOL.
@pytest.mark.parametrize("f_name", sorted(generator_losses.F_DIVERGENCES))
@pytest.mark.parametrize("teacher_name", sorted(TEACHERS))
@pytest.mark.parametrize("sigma", (0.7, 2.0))
def test_f_divergence_gradient_matches_finite_differences_of_the_expansion(f_name, teacher_name, sigma):
  f, teacher = generator_losses.F_DIVERGENCES[f_name], TEACHERS[teacher_name]
  with jax.enable_x64(True):
    z, eps = draws()
    g = f_surrogate_gradient(f, teacher, sigma, z, eps)
    fd = finite_differences(f_expansion_objective(f, teacher, sigma, z, eps))
  assert np.linalg.norm(fd) > 1e-2, "degenerate case: the expansion is flat at theta0"
  assert rel_err(g, fd) < REL_TOL, (g, fd)


def test_reverse_kl_without_its_density_branch_fails_the_same_check():
  """SIM-L2's branch alone is the gradient with the measure q_t held (SIM's sg(q_t)), not of the f-divergence."""
  f = generator_losses.F_DIVERGENCES["reverse_kl"]
  no_density = generator_losses.FDivergence(score=f.score, density=jnp.zeros_like)
  with jax.enable_x64(True):
    z, eps = draws()
    g = f_surrogate_gradient(no_density, MIXTURE, 0.7, z, eps)
    fd = finite_differences(f_expansion_objective(f, MIXTURE, 0.7, z, eps))
  assert rel_err(g, fd) > 3 * REL_TOL, (g, fd)


@pytest.mark.parametrize("f_name", ("forward_kl", "jensen_shannon"))
def test_f_divergence_with_the_ratio_stopped_fails_the_same_check(f_name):
  """The ratio must be differentiated through x_t (reverse_kl's weights are constant, so it cannot tell)."""
  f = generator_losses.F_DIVERGENCES[f_name]
  with jax.enable_x64(True):
    z, eps = draws()
    g = f_surrogate_gradient(f, MIXTURE, 0.7, z, eps, stop_ratio=True)
    fd = finite_differences(f_expansion_objective(f, MIXTURE, 0.7, z, eps))
  assert rel_err(g, fd) > 3 * REL_TOL, (g, fd)


def uni_instruct_gradient(f_name, sigma, z, eps, *, logit_sign=1.0):
  """jax.grad at theta0 of loss.name='uni_instruct' through generator_loss, its fake score returning (D, logits)
  with the logits an exact discriminator's log p - log q_theta0 (times logit_sign)."""
  entry = generator_losses.get_generator_loss(loss_config(name="uni_instruct", f=f_name, normalize=False), 2)
  def fake(p, x, s):
    del p
    logits = mixture.log_density(MIXTURE, x, s) - log_q_affine(THETA0, x, sigma)
    return affine_denoiser(THETA0, x, sigma), logit_sign * logits[:, None]
  def surrogate(v):
    loss, _ = generator_losses.generator_loss(
        v, None, None, generate=lambda v_: generated(v_, z, eps, sigma)[0], per_sample_loss=entry.per_sample,
        eps=eps, sigma=jnp.full((N,), sigma, jnp.float64), teacher_denoise=lambda p, x, s: mixture.denoise(MIXTURE, x, s),
        fake_denoise=fake, normalize=False, needs_ratio=entry.needs_ratio)
    return loss
  return np.asarray(jax.grad(surrogate)(flat(THETA0)))


@pytest.mark.parametrize("f_name", sorted(generator_losses.F_DIVERGENCES))
def test_uni_instruct_with_an_exact_discriminator_matches_finite_differences(f_name):
  """The registered loss, its ratio read from the fake score's logits (losses/adversarial.log_ratio); reverse KL,
  whose weights are constant, asks for no ratio (so no discriminator is trained for it)."""
  entry = generator_losses.get_generator_loss(loss_config(name="uni_instruct", f=f_name), 2)
  assert entry.needs_ratio == (f_name != "reverse_kl")
  with jax.enable_x64(True):
    z, eps = draws()
    g = uni_instruct_gradient(f_name, 0.7, z, eps)
    fd = finite_differences(f_expansion_objective(generator_losses.F_DIVERGENCES[f_name], MIXTURE, 0.7, z, eps))
  assert rel_err(g, fd) < REL_TOL, (g, fd)


def test_uni_instruct_with_the_discriminator_labels_swapped_fails_the_same_check():
  """Logits of a discriminator trained with real and generated swapped (log q / p): forward KL's weights see it."""
  with jax.enable_x64(True):
    z, eps = draws()
    g = uni_instruct_gradient("forward_kl", 0.7, z, eps, logit_sign=-1.0)
    fd = finite_differences(f_expansion_objective(generator_losses.F_DIVERGENCES["forward_kl"], MIXTURE, 0.7, z, eps))
  assert rel_err(g, fd) > 3 * REL_TOL, (g, fd)


def test_reverse_kl_is_twice_sid_at_alpha_one_half_and_forward_kl_is_sim_l2_weighted_by_p_over_q():
  x0, a, b, sigma = _random_batch()
  w = jnp.linspace(0.5, 2.0, x0.shape[0])
  log_r = jnp.linspace(-2.0, 2.0, x0.shape[0])
  fdiv = {name: generator_losses.f_divergence_per_sample(f) for name, f in generator_losses.F_DIVERGENCES.items()}
  np.testing.assert_allclose(fdiv["reverse_kl"](x0, a, b, sigma, w, log_r),
                             2.0 * registered("sid", alpha=0.5)(x0, a, b, sigma, w), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fdiv["forward_kl"](x0, a, b, sigma, w, log_r),
                             jnp.exp(-log_r) * registered("sim", distance="l2")(x0, a, b, sigma, w), rtol=1e-5,
                             atol=1e-5)
