"""SiDA's adversarial term and the discriminator's density ratio (losses/adversarial.py, training/sim_steps.py).

  - the networks' logits leave D unchanged and are the encoder's (SongUNet: [N, R', R']; MLP: [N, 1]);
  - trained with SiDA's loss, the logits learn log p_sigma / q_sigma, so adversarial.log_ratio is log q / p
    (checked against the exact ratio of two Gaussians; the opposite sign fails);
  - the sharded fake step is the DSM plus discriminator_weight x SiDA's loss on noised real rows (same sigma
    and noise), computed by hand, normalised over each device's rows (a 2-device worker: the per-device
    mean, not the global formula);
  - the generator step gains exactly weight x the gradient of SiDA's generator term.

This module is also its own worker for the 2-device case: `python tests/test_adversarial.py worker`.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the worker runs as a script

from simjax.diffusion import edm  # pylint: disable=wrong-import-position
from simjax.losses import adversarial, sim  # pylint: disable=wrong-import-position
from simjax.networks import mlp, precond as precond_lib  # pylint: disable=wrong-import-position
from simjax.parallel import mesh as mesh_lib  # pylint: disable=wrong-import-position
from simjax.pipelines import gmm  # pylint: disable=wrong-import-position
from simjax.training import sim_steps  # pylint: disable=wrong-import-position

BATCH = 16


def small_config(weight=0.0, loss="sim"):
  sys.path.insert(0, str(REPO / "configs"))
  import gmm2d  # pylint: disable=import-outside-toplevel
  c = gmm2d.get_config()
  c.model.hidden, c.model.num_blocks, c.model.emb_features, c.model.dropout = 32, 1, 16, 0.0
  c.batch_size, c.init.copy_steps, c.eval.batch_size = BATCH, 0, 16
  c.adversarial.weight, c.adversarial.discriminator_weight = weight, 0.5
  c.loss.name = loss
  return c


def softplus(v):
  return np.logaddexp(0.0, np.asarray(v, np.float64))


def step_setup(config, mesh_shape=(1, 1)):
  """(nets, params, consts, inputs, fns) for the sharded steps on a gmm2d MLP, everything replicated."""
  distillation, _ = gmm.build(config)
  nets = distillation.nets
  n = mesh_shape[0] * mesh_shape[1]
  mesh = mesh_lib.make_mesh(mesh_shape, devices=jax.devices()[:n])
  params = distillation.init_fn()["generator"]
  fake = jax.tree.map(lambda a: a * 1.1 + 0.01, params)  # fake != generator, so the step's roles are visible
  consts = dict(distillation.consts)
  rep = lambda t: jax.tree.map(lambda _: P(), t)
  specs = {"generator": rep(params), "fake": rep(fake), "consts": rep(consts)}
  k = jax.random.split(jax.random.key(1), 4)
  # Half the batch at small noise, half at large: the two devices' normalisations then differ.
  sigma = jnp.concatenate([jnp.full((BATCH // 2,), 0.3), jnp.full((BATCH // 2,), 3.0)])
  real = {"x": jax.random.normal(k[2], (BATCH, 2)) * 0.5 + 1.0, "cond": None}
  inputs = dict(z=jax.random.normal(k[0], (BATCH, 2)), sigma=sigma, eps=jax.random.normal(k[1], (BATCH, 2)),
                rng=jax.random.key(5), real=real)
  fns = sim_steps.make_step_grads(nets, config, mesh, specs)
  return nets, params, fake, consts, inputs, fns


def fake_step_by_hand(nets, params, fake, inputs, sigma_data, disc_weight, rows):
  """The DSM loss and SiDA's discriminator loss on `rows` of the batch, with numpy's cross-entropies."""
  z, sigma, eps, x_real = (inputs["z"][rows], inputs["sigma"][rows], inputs["eps"][rows], inputs["real"]["x"][rows])
  x_g = nets.generate(params, {}, z, None)
  def parts(fp):
    d, logits_fake = nets.fake.apply(fp, {}, x_g + sigma[:, None] * eps, sigma, None, return_logits=True)
    _, logits_real = nets.fake.apply(fp, {}, x_real + sigma[:, None] * eps, sigma, None, return_logits=True)
    dsm = jnp.mean(edm.edm_loss_weight(sigma, sigma_data) * jnp.sum((d - x_g) ** 2, axis=1))
    return dsm, logits_real, logits_fake
  dsm, logits_real, logits_fake = parts(fake)
  lam = float(np.mean(np.asarray(edm.edm_loss_weight(sigma, sigma_data), np.float64)))
  disc = lam * 0.5 * (np.mean(softplus(-np.asarray(logits_real))) + np.mean(softplus(np.asarray(logits_fake))))
  def total(fp):
    d_loss, lr, lf = parts(fp)
    return d_loss + disc_weight * lam * 0.5 * (jnp.mean(jax.nn.softplus(-lr)) + jnp.mean(jax.nn.softplus(lf)))
  return float(dsm), disc, jax.grad(total)(fake)


def tree_rel_err(a, b):
  a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
  b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run_fake_step(config, mesh_shape):
  """The sharded fake step's (dsm loss, disc_loss metric, grads) and the by-hand values (whole batch and
  per device half)."""
  nets, params, fake, consts, i, fns = step_setup(config, mesh_shape)
  loss, grads, metrics = jax.jit(fns.fake)(params, fake, consts, i["z"], None, i["sigma"], i["eps"], i["rng"],
                                           i["real"])
  args = (nets, params, fake, i, float(config.sigma_data), float(config.adversarial.discriminator_weight))
  whole = fake_step_by_hand(*args, slice(None))
  halves = [fake_step_by_hand(*args, slice(h * BATCH // 2, (h + 1) * BATCH // 2)) for h in range(2)]
  return dict(loss=float(loss), disc=float(metrics["disc_loss"]), grads=grads, whole=whole, halves=halves)


def test_logits_leave_the_denoiser_unchanged_and_come_from_the_encoder():
  arch = precond_lib.edm_preset_arch("ddpmpp", img_resolution=8, img_channels=1, model_channels=16,
                                     channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0,
                                     augment_dim=0, channel_mult_emb=2)
  unet = precond_lib.build_precond(arch)
  variables = jax.jit(precond_lib.init_params, static_argnums=0)(unet, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  sigma = jnp.array([0.1, 1.0, 10.0])
  apply = jax.jit(unet.apply, static_argnames="return_logits")
  d, logits = apply(variables, x, sigma, None, return_logits=True)
  np.testing.assert_allclose(np.asarray(d), np.asarray(apply(variables, x, sigma, None)), rtol=1e-6, atol=1e-6)
  assert logits.shape == (3, 4, 4) and logits.dtype == jnp.float32  # the 8x8 input's 4x4 bottleneck
  assert float(jnp.std(logits)) > 0
  # They depend on the input, and only the encoder's parameters reach them.
  grads = jax.jit(jax.grad(lambda p: jnp.sum(unet.apply({"params": p}, x, sigma, None, return_logits=True)[1])))(
      variables["params"])
  dec_norm = sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads["model"]["dec"]))
  enc_norm = sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads["model"]["enc"]))
  assert dec_norm == 0.0 and enc_norm > 0.0
  net = mlp.MLPDenoiser(data_dim=2, hidden=16, num_blocks=1, emb_features=8)
  v = net.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.ones((1,)))
  y = jax.random.normal(jax.random.key(2), (5, 2))
  d, logits = net.apply(v, y, jnp.ones((5,)), return_logits=True)
  np.testing.assert_array_equal(np.asarray(d), np.asarray(net.apply(v, y, jnp.ones((5,)))))
  assert logits.shape == (5, 1)


def test_the_discriminator_learns_the_log_density_ratio():
  """Real ~ N(0, s0^2 I), generated ~ N(m, s0^2 I), both noised at sigma: log q/p is linear in x and exact.
  SiDA's loss on the MLP's logits recovers it; the opposite sign (real labelled 0) is far off."""
  s0, sigma, shift = 0.5, 0.3, jnp.array([0.6, -0.3])
  var = s0 ** 2 + sigma ** 2
  net = mlp.MLPDenoiser(data_dim=2, hidden=64, num_blocks=2, emb_features=16)
  params = net.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.ones((1,)))["params"]
  opt = optax.adam(2e-3)
  sig = jnp.full((512,), sigma)

  def loss_fn(p, key):
    k_r, k_f = jax.random.split(key)
    real = s0 * jax.random.normal(k_r, (512, 2)) + sigma * jax.random.normal(jax.random.fold_in(k_r, 1), (512, 2))
    gen = shift + s0 * jax.random.normal(k_f, (512, 2)) + sigma * jax.random.normal(jax.random.fold_in(k_f, 1),
                                                                                     (512, 2))
    logits = lambda x: net.apply({"params": p}, x, sig, return_logits=True)[1]
    return adversarial.discriminator_loss(logits(real), logits(gen), sig)

  @jax.jit
  def step(carry, i):
    p, o = carry
    g = jax.grad(loss_fn)(p, jax.random.fold_in(jax.random.key(1), i))
    u, o = opt.update(g, o, p)
    return (optax.apply_updates(p, u), o), None

  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(1500))
  x = jnp.sqrt(var) * jax.random.normal(jax.random.key(3), (2000, 2)) + 0.5 * shift  # where both have mass
  exact = (jnp.sum((x - 0) ** 2, axis=1) - jnp.sum((x - shift) ** 2, axis=1)) / (2 * var)  # log q - log p
  got = adversarial.log_ratio(net.apply({"params": params}, x, jnp.full((2000,), sigma), return_logits=True)[1])
  err = float(jnp.sqrt(jnp.mean((got - exact) ** 2)) / jnp.std(exact))
  flipped = float(jnp.sqrt(jnp.mean((-got - exact) ** 2)) / jnp.std(exact))
  assert err < 0.15, err
  assert flipped > 1.5, flipped


def test_fake_step_adds_sidas_discriminator_loss_on_real_rows():
  out = run_fake_step(small_config(weight=1e-3), (1, 1))
  dsm, disc, grads = out["whole"]
  np.testing.assert_allclose(out["loss"], dsm, rtol=1e-5)  # fake_loss stays the DSM loss
  np.testing.assert_allclose(out["disc"], disc, rtol=1e-5)
  assert tree_rel_err(out["grads"], grads) < 1e-4
  # The control: without the discriminator the step's gradient is the DSM's alone, visibly different.
  nets, params, fake, consts, i, fns = step_setup(small_config(weight=0.0))
  _, plain, metrics = jax.jit(fns.fake)(params, fake, consts, i["z"], None, i["sigma"], i["eps"], i["rng"])
  assert "disc_loss" not in metrics
  assert tree_rel_err(plain, grads) > 1e-2


def test_generator_step_gains_weight_times_sidas_generator_term():
  results = {}
  for weight in (0.0, 0.5):
    config = small_config(weight=weight)
    nets, params, fake, consts, i, fns = step_setup(config)
    results[weight] = jax.jit(fns.generator)(params, fake, consts, i["z"], None, i["sigma"], i["eps"], i["rng"])
  rng = jax.random.fold_in(i["rng"], 0)  # the step's stream on device 0

  def term(p):
    x0 = nets.generate(p, {}, i["z"], None, train=True, rng=rng)
    x_t = x0 + i["sigma"][:, None] * i["eps"]
    a = nets.teacher.apply(None, consts["teacher"], x_t, i["sigma"])
    _, logits = nets.fake.apply(fake, {}, x_t, i["sigma"], None, return_logits=True)
    w = sim.dmd_normalizer(x0, a, float(config.loss.normalize_floor))
    return jnp.mean(w) * 2.0 * jnp.mean(jax.nn.softplus(-jnp.clip(logits, -10, 10)))

  want = jax.grad(term)(params)
  diff = jax.tree.map(lambda a, b: (a - b) / 0.5, results[0.5][1], results[0.0][1])
  assert tree_rel_err(diff, want) < 1e-3
  np.testing.assert_allclose(float(results[0.5][2]["adv_loss"]), float(term(params)), rtol=1e-5)
  assert "adv_loss" not in results[0.0][2]
  # Before SiDA's start (adversarial_on = 0) the term is reported but adds nothing.
  gated = jax.jit(fns.generator)(params, fake, consts, i["z"], None, i["sigma"], i["eps"], i["rng"], None, 0.0)
  # Equal up to float32 reassociation (the gated program computes the term and multiplies it by 0); the term
  # itself moves the gradients by 0.5 * want, checked above to be the term's gradient.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), gated[1], results[0.0][1])
  np.testing.assert_allclose(float(gated[2]["adv_loss"]), float(term(params)), rtol=1e-5)


def test_adversarial_term_waits_for_its_image_count():
  """adversarial.start_images gates the generator's term in the iteration; the discriminator trains from step 0."""
  from simjax.training import state as state_lib  # pylint: disable=import-outside-toplevel
  ends = {}
  for start in (0.0, 1e9):
    config = small_config(weight=0.5)
    config.adversarial.start_images = start
    distillation, _ = gmm.build(config)
    mesh = mesh_lib.make_mesh((1, 1), devices=jax.devices()[:1])
    init = distillation.init_fn()
    state = state_lib.new_state(init, distillation.optimizers, ("generator",))
    rep = lambda t: jax.tree.map(lambda _: P(), t)
    consts = {**distillation.consts, sim_steps.REAL: distillation.real_samples()}
    specs = {"generator": rep(init["generator"]), "fake": rep(init["fake"]), "consts": rep(consts)}
    iteration = sim_steps.make_sim_iteration(distillation.nets, config, mesh, specs, distillation.optimizers)
    ends[start], metrics = jax.jit(iteration)(state, consts)
    assert float(metrics["adv_loss"]) > 0 and float(metrics["disc_loss"]) > 0
  jax.tree.map(np.testing.assert_array_equal, ends[0.0].params["fake"], ends[1e9].params["fake"])
  assert tree_rel_err(ends[1e9].params["generator"], ends[0.0].params["generator"]) > 1e-6


def test_discriminator_losses_are_normalised_per_device():
  """On 2 devices the fake step's discriminator loss and gradient are the mean of each device's own SiDA loss
  (its batch means and lambda), which differs from the one-device formula on the same rows."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
  proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "worker"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 2
  assert abs(out["disc"] - out["per_device"]) <= 1e-5 * abs(out["per_device"]), out
  assert out["grad_err_per_device"] < 1e-4, out
  assert abs(out["global"] - out["per_device"]) > 1e-2 * abs(out["per_device"]), out  # the two formulas differ


def _worker():
  jax.config.update("jax_threefry_partitionable", True)
  out = run_fake_step(small_config(weight=1e-3), (2, 1))
  per_device = float(np.mean([h[1] for h in out["halves"]]))
  grads = jax.tree.map(lambda a, b: (a + b) / 2, out["halves"][0][2], out["halves"][1][2])
  print(json.dumps({"devices": jax.device_count(), "disc": out["disc"], "per_device": per_device,
                    "grad_err_per_device": tree_rel_err(out["grads"], grads), "global": out["whole"][1]}))


if __name__ == "__main__":
  if sys.argv[1:] == ["worker"]:
    _worker()


def test_grad_value_clip_clips_each_entry_before_adam():
  """SiDA clips the fake score's gradient values at 1 (clip_grad_value_): Adam's second moment sees the clipped ones."""
  from simjax.training import state as state_lib  # pylint: disable=import-outside-toplevel
  config = small_config()
  optim = config.optim.fake
  grads = {"w": jnp.array([5.0, -0.5, -3.0])}
  params = {"w": jnp.zeros(3)}
  nus = {}
  for clip in (0.0, 1.0):
    optim.grad_value_clip = clip
    opt = state_lib.make_optimizer(optim)
    state = opt.init(params)
    _, state = opt.update(grads, state, params)
    adam_state = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                  if isinstance(s, optax.ScaleByAdamState)][0]
    nus[clip] = np.asarray(adam_state.nu["w"])
  b2 = float(optim.b2)
  np.testing.assert_allclose(nus[0.0], (1 - b2) * np.array([25.0, 0.25, 9.0]), rtol=1e-6)
  np.testing.assert_allclose(nus[1.0], (1 - b2) * np.array([1.0, 0.25, 1.0]), rtol=1e-6)
