"""Conditions as pytrees (simjax.conditioning): checks, null conditions, dropout, guidance, networks, sampler.

The sharded SIM step with text conditions is tested in test_sharding.py (device-count independence,
and that blanking the prompts changes the step: the condition reaches the networks).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simjax import conditioning, sampling
from simjax.conditioning import CondSpace
from simjax.errors import UserError
from simjax.networks.mlp import MLPDenoiser, pool_text
from simjax.parallel import mesh as mesh_lib
from simjax.teachers import guidance

TEXT = CondSpace(text_length=6, text_dim=4)


def _text(n, seed=0):
  k_e, k_l = jax.random.split(jax.random.key(seed))
  lengths = jax.random.randint(k_l, (n,), 1, TEXT.text_length + 1)
  return {"emb": jax.random.normal(k_e, (n, TEXT.text_length, TEXT.text_dim)),
          "mask": (jnp.arange(TEXT.text_length)[None] < lengths[:, None]).astype(jnp.float32)}


def test_spaces_check_kinds_and_shapes():
  TEXT.check(_text(3), 3)
  CondSpace(label_dim=5).check(jnp.zeros((2, 5)), 2)
  CondSpace().check(None)
  text_3 = r"takes a text condition \{'emb': \[3, 6, 4\], 'mask': \[3, 6\]\}; got "
  labels_3 = r"takes one-hot class labels \[3, 5\]; got "
  cases = [(TEXT, jnp.zeros((3, 4)), text_3 + r"\(3, 4\)"), (TEXT, {"emb": jnp.zeros((3, 6, 4))}, text_3),
           (TEXT, {"emb": jnp.zeros((3, 6, 5)), "mask": jnp.zeros((3, 6))}, text_3),
           (TEXT, {"emb": jnp.zeros((3, 6, 4)), "mask": jnp.zeros((2, 6))}, text_3),
           (TEXT, _text(4), text_3), (CondSpace(label_dim=5), _text(3), labels_3),
           (CondSpace(label_dim=5), jnp.zeros((3, 4)), labels_3 + r"\(3, 4\)"),
           (CondSpace(label_dim=5), None, labels_3 + "None")]
  for space, cond, pattern in cases:
    with pytest.raises(UserError, match=pattern):
      space.check(cond, 3)
  with pytest.raises(ValueError):
    CondSpace(label_dim=3, text_length=2, text_dim=2)


def test_dropout_replaces_whole_rows_with_the_null_condition():
  cond = _text(4000)
  learned_null = {"emb": jnp.full((6, 4), 0.25), "mask": jnp.eye(1, 6)[0]}
  dropped = conditioning.drop(jax.random.key(3), cond, 0.3, learned_null)
  is_null = np.all(np.asarray(dropped["emb"]) == 0.25, axis=(1, 2))
  assert abs(is_null.mean() - 0.3) < 0.03, is_null.mean()
  np.testing.assert_array_equal(np.asarray(dropped["mask"])[is_null], np.tile(np.eye(1, 6), (is_null.sum(), 1)))
  for key in ("emb", "mask"):  # kept rows are untouched, emb and mask from the same row
    np.testing.assert_array_equal(np.asarray(dropped[key])[~is_null], np.asarray(cond[key])[~is_null])
  zeros = conditioning.drop(jax.random.key(3), cond, 0.3)
  assert np.array_equal(np.all(np.asarray(zeros["emb"]) == 0, axis=(1, 2)), is_null)  # same rows, zero null
  assert conditioning.drop(jax.random.key(3), cond, 0.0) is cond


def _toy_text_denoise(x, sigma, cond):
  return jnp.tanh(x) * (1.0 + sigma[:, None]) + pool_text(cond)[:, :2] * x ** 2


def test_guidance_of_a_text_condition_uses_the_given_null():
  x = jax.random.normal(jax.random.key(1), (7, 2))
  sigma = jnp.linspace(0.1, 3.0, 7)
  cond = _text(7, seed=2)
  null = {"emb": jnp.ones((6, 4)), "mask": jnp.eye(1, 6)[0]}
  d_c = _toy_text_denoise(x, sigma, cond)
  d_null = _toy_text_denoise(x, sigma, conditioning.null_like(cond, null))
  got = guidance.guided(_toy_text_denoise, 3.0, null)(x, sigma, cond)
  np.testing.assert_allclose(got, d_null + 3.0 * (d_c - d_null), rtol=1e-5, atol=1e-6)
  zero_null = guidance.guided(_toy_text_denoise, 3.0)(x, sigma, cond)
  assert not np.allclose(zero_null, got), "the given null condition was ignored"


def test_text_mlp_reads_unmasked_tokens_only():
  net = MLPDenoiser(data_dim=3, hidden=16, num_blocks=1, emb_features=8, text_dim=4)
  x, sigma, cond = jax.random.normal(jax.random.key(0), (5, 3)), jnp.full((5,), 0.7), _text(5)
  params = net.init(jax.random.key(1), x, sigma, cond)
  # Away from the initialisation, whose zero output layers make every block ignore its input.
  leaves, tree = jax.tree.flatten(params)
  params = jax.tree.unflatten(tree, [p + 0.3 * jax.random.normal(jax.random.key(i), p.shape) for i, p in enumerate(leaves)])
  out = net.apply(params, x, sigma, cond)
  padding = 1.0 - cond["mask"][..., None]
  noisy_padding = {"emb": cond["emb"] + 5.0 * padding * jax.random.normal(jax.random.key(2), cond["emb"].shape),
                   "mask": cond["mask"]}
  np.testing.assert_allclose(net.apply(params, x, sigma, noisy_padding), out, rtol=1e-5, atol=1e-6)
  other = _text(5, seed=9)
  assert not np.allclose(net.apply(params, x, sigma, other), out, atol=1e-4), "the text condition is not read"
  with pytest.raises(ValueError, match="label condition"):
    net.apply(params, x, sigma, jnp.zeros((5, 4)))


def test_edm_networks_refuse_text_conditions():
  from simjax.networks import precond  # pylint: disable=import-outside-toplevel
  module = precond.build_precond(precond.edm_preset_arch("ddpmpp", img_resolution=8, img_channels=1, label_dim=0,
                                                         model_channels=8, channel_mult=[1], num_blocks=1,
                                                         attn_resolutions=[], augment_dim=0))
  variables = precond.init_params(module, jax.random.key(0))
  with pytest.raises(ValueError, match="class labels, not text"):
    module.apply(variables, jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)), _text(1))


def test_sampler_draws_text_conditions_from_the_pool_or_takes_them_given():
  mesh = mesh_lib.make_mesh((-1, 1))
  pool = _text(5, seed=4)
  batch_fn = sampling.shard_rows(lambda p, z, c: z * p + pool_text(c)[:, :3], mesh)
  kwargs = dict(num=9, batch_size=4, seed=1, data_shape=(3,), cond_space=TEXT, mesh=mesh)
  out = sampling.sample(jax.jit(batch_fn), jnp.float32(0.5), cond_pool=pool, **kwargs)
  assert out.labels is None and out.cond["emb"].shape == (9, 6, 4)
  # Every drawn condition is one of the pool's rows, emb and mask together.
  matches = np.all(out.cond["emb"][:, None] == np.asarray(pool["emb"])[None], axis=(2, 3))
  assert np.all(matches.sum(1) >= 1)
  idx = matches.argmax(1)
  np.testing.assert_array_equal(out.cond["mask"], np.asarray(pool["mask"])[idx])
  given = _text(9, seed=7)
  forced = sampling.sample(jax.jit(batch_fn), jnp.float32(0.5), cond=given, **kwargs)
  np.testing.assert_array_equal(forced.cond["emb"], np.asarray(given["emb"]))
  # Same seed, other conditions: the latents stay, so x differs by exactly the condition's term.
  np.testing.assert_allclose(forced.x - np.asarray(pool_text(given))[:, :3],
                             out.x - np.asarray(pool_text(out.cond))[:, :3], rtol=1e-5, atol=1e-6)
  with pytest.raises(UserError, match="the conditions to sample: this model takes a text condition"):
    sampling.sample(jax.jit(batch_fn), jnp.float32(0.5), cond=_text(8), **kwargs)
  with pytest.raises(UserError, match="pass cond= or cond_pool="):
    sampling.sample(jax.jit(batch_fn), jnp.float32(0.5), **kwargs)
  # A reused noise function does not stand in for the pool: without one, nothing is drawn silently.
  with pytest.raises(UserError, match="pass cond= or cond_pool="):
    sampling.sample(jax.jit(batch_fn), jnp.float32(0.5), noise_fn=sampling.make_noise_fn(4, (3,), TEXT, mesh), **kwargs)
