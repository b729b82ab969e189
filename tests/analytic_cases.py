"""Analytic cases for the finite-difference tests of the generator losses (test_sim_gradient.py,
test_loss_family.py): an affine Gaussian generator x0 = m + L z, whose diffused density
q_t = N(m, L L^T + sigma^2 I) has an exact denoiser that stands in for the fake score, and a Gaussian
and a three-component mixture teacher.
"""
import jax.numpy as jnp

from simjax.teachers import mixture

N = 400_000     # Monte-Carlo samples; the surrogate and the divergence share them (common random numbers)
REL_TOL = 0.04  # relative error allowed between the MC gradient and the FD gradient
H = 1e-3        # finite-difference step (float64)

GAUSSIAN = mixture.Mixture(jnp.array([[0.3, -0.2]]), jnp.array([[0.6, 0.4]]), jnp.array([1.0]))
MIXTURE = mixture.Mixture(jnp.array([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.2]]),
                      jnp.array([[0.3, 0.3], [0.4, 0.2], [0.25, 0.5]]), jnp.array([0.3, 0.5, 0.2]))
THETA0 = {"m": jnp.array([0.1, 0.2]), "L": jnp.array([[0.9, 0.0], [0.3, 0.7]])}


def affine_denoiser(theta, x, sigma):
  """Exact D_q(x) = x + sigma^2 grad log N(x; m, L L^T + sigma^2 I)."""
  cov = theta["L"] @ theta["L"].T + sigma**2 * jnp.eye(2)
  return x - sigma**2 * jnp.linalg.solve(cov, (x - theta["m"]).T).T


def flat(theta):
  return jnp.concatenate([theta["m"], theta["L"].ravel()])


def unflat(v):
  return {"m": v[:2], "L": v[2:].reshape(2, 2)}
