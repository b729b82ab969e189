"""simjax.load_generator on a class-conditional export (random weights, tiny SongUNet): classes, seeds, bad input."""
import json

import jax
import numpy as np
import pytest

import simjax
from simjax.errors import UserError
from simjax.exported import INFO_FILE
from simjax.networks import precond as precond_lib
from simjax.teachers import edm_checkpoints

CLASSES = 3


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  """A workdir holding generator/ as an image run exports it, with a class-conditional network."""
  wd = tmp_path_factory.mktemp("run")
  arch = precond_lib.edm_preset_arch("ddpmpp", img_resolution=8, img_channels=1, label_dim=CLASSES, model_channels=16,
                                     channel_mult=(1,), num_blocks=1, attn_resolutions=(), dropout=0.0, augment_dim=0,
                                     channel_mult_emb=2)
  module = precond_lib.build_precond(arch)
  variables = jax.jit(precond_lib.init_params, static_argnums=0)(module, jax.random.key(0))
  # EDM zero-initialises the output layer: perturb every weight so the output depends on input and class.
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  variables = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  edm_checkpoints.save_converted(wd / "generator", arch, variables)
  (wd / "generator" / INFO_FILE).write_text(json.dumps({"sigma_init": 2.5, "nfe": 1, "step": 7}))
  return wd


def test_samples_follow_seed_and_class(export):
  gen = simjax.load_generator(export)
  assert gen.label_dim == CLASSES and gen.data_shape == (8, 8, 1) and gen.step == 7
  classes = np.array([0, 1, 2, 0, 1])
  x, labels = gen.sample(5, seed=3, cond=classes, return_labels=True)
  assert x.shape == (5, 8, 8, 1) and x.dtype == np.float32 and -1.0 <= x.min() and x.max() <= 1.0
  np.testing.assert_array_equal(labels, np.eye(CLASSES)[classes])
  # Same seed and classes: the same images, from the workdir or from its generator/ folder.
  np.testing.assert_array_equal(x, simjax.load_generator(export / "generator").sample(5, seed=3, cond=classes))
  np.testing.assert_array_equal(x, gen.sample(5, seed=3, cond=np.eye(CLASSES)[classes]))
  # Another class with the same seed changes the image; another seed with the same class does too.
  other = gen.sample(5, seed=3, cond=(classes + 1) % CLASSES)
  assert np.abs(other - x).max() > 1e-3
  assert np.abs(gen.sample(5, seed=4, cond=classes) - x).max() > 1e-3
  # The latents depend on the seed only: a row keeps its image when only other rows' classes change.
  mixed = gen.sample(5, seed=3, cond=np.array([0, 2, 2, 2, 2]))
  np.testing.assert_allclose(mixed[0], x[0], atol=1e-6)
  assert np.abs(mixed[1] - x[1]).max() > 1e-3
  # Without cond, classes are drawn (uniformly, seeded) and returned.
  free, drawn = gen.sample(12, seed=0, return_labels=True)
  assert drawn.shape == (12, CLASSES) and np.all(drawn.sum(1) == 1)
  np.testing.assert_array_equal(free, gen.sample(12, seed=0, cond=drawn.argmax(1)))


def test_bad_input_is_one_line(export, tmp_path):
  gen = simjax.load_generator(export)
  with pytest.raises(UserError, match="integer classes in"):
    gen.sample(2, cond=np.array([0, CLASSES]))
  with pytest.raises(UserError, match="one-hot class labels"):
    gen.sample(2, cond=np.ones((3, CLASSES)))
  with pytest.raises(UserError, match="no exported generator"):
    simjax.load_generator(tmp_path)
