"""The fake score's DSM uses EDM's augmentation pipe where the network takes augmentation labels (SiD).

The sharded fake step is compared with the DSM computed by hand: on the generator's eval-mode samples,
augmented with the step's own key and conditioned on the labels (p = 1, every image transformed), and
without augmentation at p = 0 or for a network that has no augmentation labels.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import REPO
from simjax.data import augment as augment_lib
from simjax.losses import dsm
from simjax.networks import precond as precond_lib
from simjax.parallel import mesh as mesh_lib
from simjax import config_files
from simjax.training import sim_steps
from simjax.conditioning import CondSpace
from simjax.training.roles import Denoiser, DistillNetworks

BATCH = 8


def _setup(augment_dim):
  arch = precond_lib.edm_preset_arch("ddpmpp", img_resolution=8, img_channels=3, model_channels=16, channel_mult=(1,),
                                     num_blocks=1, attn_resolutions=(), dropout=0.0, augment_dim=augment_dim,
                                     channel_mult_emb=2)
  module = precond_lib.build_precond(arch)
  with jax.threefry_partitionable(False):
    variables = jax.jit(precond_lib.init_params, static_argnums=0)(module, jax.random.key(0))
  params = jax.tree.map(lambda x: x + 0.05 * jnp.std(x) * jnp.ones_like(x), variables["params"])
  nets = DistillNetworks(generator=Denoiser(module), fake=Denoiser(module), teacher=Denoiser(module),
                         data_shape=(8, 8, 3), cond_space=CondSpace(), sigma_init=2.5)
  k = jax.random.split(jax.random.key(1), 3)
  inputs = (jax.random.normal(k[0], (BATCH, 8, 8, 3)), None, jnp.exp(jax.random.normal(k[1], (BATCH,))),
            jax.random.normal(k[2], (BATCH, 8, 8, 3)), jax.random.key(5))
  return nets, variables, params, inputs


def _fake_step(nets, variables, params, inputs, p):
  config = config_files.load(REPO / "configs" / "common.py").image_config()
  config.batch_size, config.fake_augment_p = BATCH, p
  mesh = mesh_lib.make_mesh((1, 1), devices=jax.devices()[:1])
  consts = {"teacher": variables, "generator": {}, "fake": {}}
  rep = lambda t: jax.tree.map(lambda _: P(), t)
  specs = {"generator": rep(params), "fake": rep(params), "consts": rep(consts)}
  fn = sim_steps.make_step_grads(nets, config, mesh, specs).fake
  loss, grads, _ = jax.jit(fn)(params, params, consts, *inputs)
  return loss, grads


def _dsm_by_hand(nets, params, inputs, p):
  z, _, sigma, eps, rng = inputs
  x_g = nets.generate(params, {}, z, None)  # eval mode: no dropout
  labels = None
  if p:
    x_g, labels = augment_lib.augment(jax.random.fold_in(jax.random.fold_in(rng, 0), 2), x_g, p)
  denoise = lambda q, x, s: nets.fake.apply(q, {}, x, s, None, augment_labels=labels)
  return jax.value_and_grad(dsm.dsm_loss)(params, denoise, x_g, sigma, eps)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_fake_dsm_matches_the_augmented_loss_by_hand(p):
  nets, variables, params, inputs = _setup(augment_dim=9)
  loss, grads = _fake_step(nets, variables, params, inputs, p)
  want_loss, want_grads = _dsm_by_hand(nets, params, inputs, p)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), grads, want_grads)
  if p:  # the control: the augmented loss is not the plain one, so the comparison above can fail
    plain_loss, _ = _dsm_by_hand(nets, params, inputs, 0.0)
    assert abs(float(plain_loss) - float(loss)) > 1e-3 * abs(float(plain_loss))


def test_networks_without_augmentation_labels_are_not_augmented():
  nets, _, _, _ = _setup(augment_dim=0)
  config = config_files.load(REPO / "configs" / "common.py").image_config()
  assert config.fake_augment_p == 0.12 and sim_steps.fake_augment_probability(config, nets) == 0.0
  nets9, _, _, _ = _setup(augment_dim=9)
  assert sim_steps.fake_augment_probability(config, nets9) == 0.12
  config.fake_augment_p = 1.5
  with pytest.raises(ValueError, match="fake_augment_p must lie in"):
    sim_steps.fake_augment_probability(config, nets9)
