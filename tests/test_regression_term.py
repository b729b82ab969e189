"""DMD's regression term (simjax/training/regression.py): pairs are the teacher's Heun samples from the
generator's own latents, and the generator step's gradient gains exactly weight x the regression gradient."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import REPO
from simjax.diffusion import samplers
from simjax.errors import UserError
from simjax.parallel import mesh as mesh_lib
from simjax.pipelines import gmm
from simjax.teachers import mixture
from simjax.training import regression, sim_steps


def small_config(weight=0.25, pairs=64):
  sys.path.insert(0, str(REPO / "configs"))
  import gmm2d  # pylint: disable=import-outside-toplevel
  c = gmm2d.get_config()
  c.model.hidden, c.model.num_blocks, c.model.emb_features, c.batch_size = 32, 1, 16, 32
  c.init.copy_steps = 0
  c.eval.batch_size = 32
  c.loss.regression_weight, c.loss.regression_pairs = weight, pairs
  return c


def test_pairs_are_the_teachers_heun_samples_from_the_same_latents():
  config = small_config(pairs=50)  # not a multiple of the sampling batch: the last batch is padded
  distillation, problem = gmm.build(config)
  mesh = mesh_lib.make_mesh((1, 1), jax.devices()[:1])
  pairs = regression.make_pairs(distillation.nets, distillation.consts["teacher"], config, mesh)
  assert pairs["z"].shape == pairs["x"].shape == (50, 2) and pairs["cond"] is None
  want = samplers.heun_sample(lambda x, s: mixture.denoise(problem.model_mix, x, s),
                              jnp.asarray(pairs["z"]), num_steps=int(config.eval.teacher_steps),
                              sigma_min=float(config.sigma_min), sigma_max=float(config.sigma_max), rho=float(config.rho))
  np.testing.assert_allclose(pairs["x"], np.asarray(want), rtol=1e-4, atol=1e-4)
  # The latents are fresh N(0, I) draws, distinct per pair, and the same again for the same seed.
  assert len({tuple(r) for r in np.round(pairs["z"], 6)}) == 50 and abs(float(pairs["z"].std()) - 1.0) < 0.25
  again = regression.make_pairs(distillation.nets, distillation.consts["teacher"], config, mesh)
  np.testing.assert_array_equal(again["x"], pairs["x"])


def generator_grads(config, pairs):
  distillation, _ = gmm.build(config)
  nets = distillation.nets
  mesh = mesh_lib.make_mesh((1, 1), jax.devices()[:1])
  params = distillation.init_fn()["generator"]
  consts = {**distillation.consts, "regression": pairs}
  rep = lambda t: jax.tree.map(lambda _: P(), t)
  specs = {"generator": rep(params), "fake": rep(params), "consts": rep(consts)}
  k = jax.random.split(jax.random.key(1), 3)
  b = int(config.batch_size)
  inputs = (jax.random.normal(k[0], (b, 2)), None, jnp.exp(jax.random.normal(k[1], (b,))),
            jax.random.normal(k[2], (b, 2)), jax.random.key(5))
  fn = sim_steps.make_step_grads(nets, config, mesh, specs).generator
  return nets, params, jax.jit(fn)(params, params, consts, *inputs)[:2]


def test_the_generator_step_gains_weight_times_the_regression_gradient():
  config = small_config(weight=0.0)
  distillation, _ = gmm.build(config)
  pairs = regression.make_pairs(distillation.nets, distillation.consts["teacher"], config,
                                mesh_lib.make_mesh((1, 1), jax.devices()[:1]))
  _, params, (loss0, grads0) = generator_grads(config, pairs)
  config.loss.regression_weight = 2.0
  nets, _, (loss2, grads2) = generator_grads(config, pairs)
  # By hand, with the step's own streams: rng fold_in(key(5), device 0), then 5 (dropout) and 6 (the draw).
  rng = jax.random.fold_in(jax.random.key(5), 0)
  def reg(p):
    return regression.loss(lambda z, c: nets.generate(p, {}, z, c, train=True, rng=jax.random.fold_in(rng, 5)),
                           pairs, jax.random.fold_in(rng, 6), int(config.batch_size))
  value, want = jax.value_and_grad(reg)(params)
  assert float(value) > 1e-3, "degenerate: the generator already reproduces the pairs"
  np.testing.assert_allclose(float(loss2 - loss0), 2.0 * float(value), rtol=1e-4)
  jax.tree.map(lambda g2, g0, w: np.testing.assert_allclose(g2 - g0, 2.0 * w, rtol=1e-3, atol=1e-6),
               grads2, grads0, want)


@pytest.mark.parametrize("weight,pairs,match", [(-1.0, 64, "regression_weight"), (float("inf"), 64, "regression_weight"),
                                                (0.5, 0, "regression_pairs")])
def test_bad_regression_settings_are_refused(weight, pairs, match):
  with pytest.raises(UserError, match=match):
    regression.settings(small_config(weight=weight, pairs=pairs))
