"""The SIM iteration as one pure, jittable function: fake-score DSM update(s), then a generator update.

iteration(state, consts) -> (state, metrics); compile with `jax.jit(..., donate_argnums=0)`.
Noise for the *global* batch is drawn outside shard_map from fold_in(base_key, step), so with
`jax_threefry_partitionable` the numbers do not depend on the device count. Per-device losses and
gradients run inside `jax.shard_map`, averaged with explicit collectives (DESIGN.md section 2).
"""
import math
from typing import Callable, Dict, NamedTuple, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from simjax import draws
from simjax.data import augment as augment_lib
from simjax.diffusion import edm
from simjax.errors import UserError
from simjax.losses import adversarial
from simjax.losses import dsm
from simjax.losses import generator as generator_losses
from simjax.parallel import mesh as mesh_lib
from simjax.teachers import guidance
from simjax.training import perf as perf_lib
from simjax.training import regression
from simjax.training import state as state_lib
from simjax.training.roles import DistillNetworks


def device_index(mesh):
  """This device's position along the batch axes, inside shard_map."""
  return jax.lax.axis_index(mesh_lib.DATA) * mesh.shape[mesh_lib.FSDP] + jax.lax.axis_index(mesh_lib.FSDP)


def average_grads(grads, specs, mesh):
  """Mean gradient over the whole global batch.

  A sharded leaf's gradient arrives reduce-scattered (summed over 'fsdp' by the transpose of the
  all-gather), so it only needs the 'data' mean and a 1/fsdp scale; a replicated one is averaged
  over every batch axis.
  """
  n_fsdp = mesh.shape[mesh_lib.FSDP]
  def avg(g, spec):
    if mesh_lib.FSDP in tuple(spec):
      return jax.lax.pmean(g, mesh_lib.DATA) / n_fsdp
    return jax.lax.pmean(g, mesh_lib.BATCH_AXES)
  return jax.tree.map(avg, grads, specs, is_leaf=lambda s: isinstance(s, P))


def constrain_batch(tree, mesh):
  """Every array of `tree` (an array, a condition pytree or None) split by rows over the batch axes."""
  return jax.lax.with_sharding_constraint(tree, mesh_lib.batch_shardings(mesh, tree))


# consts key of the real samples the discriminator sees ({'x': [M, ...], 'cond': [M, label_dim] or None}); drawn
# from in the iteration, outside shard_map, so it never enters the per-device step.
REAL = "real"
# consts key of the null condition the guided teacher contrasts with (one row, no batch axis: a text
# teacher's null caption); absent: zeros.
NULL_COND = "null_cond"
# When the discriminator is trained, for the refusals that name it.
DISCRIMINATOR_USE = "adversarial.weight > 0, or loss.name='uni_instruct' with loss.f other than reverse_kl"


def discriminator_needed(config, data_dim: int) -> bool:
  """Whether the fake score is also trained as SiDA's discriminator (losses/adversarial.py): for the adversarial
  term (adversarial.weight > 0) or for a loss that needs the density ratio (loss.name='uni_instruct')."""
  return (adversarial.settings(config)[0] > 0
          or generator_losses.get_generator_loss(config.loss, data_dim).needs_ratio)


def check_discriminator(config, data_dim: int, nets: DistillNetworks = None) -> bool:
  """`discriminator_needed`, with the settings it cannot run under refused (one line naming the fix)."""
  if not discriminator_needed(config, data_dim):
    return False
  if perf_lib.resolve(config).fuse_teacher_fake:
    raise UserError(f"the discriminator ({DISCRIMINATOR_USE}) reads the fake score's logits, which the fused call "
                    "does not return; set --config.perf.fuse_teacher_fake=False.")
  if nets is not None and not nets.fake.has_logits:
    raise UserError(f"the discriminator needs a fake score with an encoder head (SongUNet or the MLP), got "
                    f"{type(nets.fake.module).__name__}; set --config.adversarial.weight=0 and another loss.name.")
  return True


def check_logvar_weighting(config, nets: DistillNetworks) -> bool:
  """loss.logvar_weighting (SiD's --return_logvar): only for a fake score with EDM2's uncertainty head."""
  on = bool(config.loss.logvar_weighting)
  if on and not nets.fake.has_logvar:
    raise UserError(f"loss.logvar_weighting needs EDM2's uncertainty head (an EDM2 teacher), but the fake score is "
                    f"{type(nets.fake.module).__name__}; set --config.loss.logvar_weighting=False.")
  return on


def draw_real(key, pool, batch, mesh):
  """`batch` rows of the real pool, uniformly with replacement (global batch, sharded)."""
  idx = jax.random.randint(key, (batch,), 0, pool["x"].shape[0])
  return constrain_batch(jax.tree.map(lambda a: jnp.take(a, idx, axis=0), pool), mesh)


def draw_generator_noise(key, batch, nets: DistillNetworks, mesh, cond_pool=None):
  """Latents z and conditions for one batch of generator samples (global batch, sharded); text
  conditions are rows of `cond_pool`."""
  k_z, k_cond = jax.random.split(key)
  z = constrain_batch(draws.normal(k_z, (batch,) + tuple(nets.data_shape), jnp.float32), mesh)
  return z, constrain_batch(nets.cond_space.draw(k_cond, batch, cond_pool), mesh)


class StepGrads(NamedTuple):
  """The two sharded loss-and-gradient functions of a SIM iteration.

  Each is f(gen_params, fake_params, consts, z, cond, sigma, eps, rng[, real]) -> (mean loss, mean grads,
  metrics): `fake` the DSM loss of the fake score on stop-gradient generator samples (grads w.r.t. fake
  params; with the discriminator, its loss on `real` rows too, in metrics as disc_loss), `generator` the
  generator loss (grads w.r.t. generator params; the adversarial term in metrics as adv_loss). t_range is
  the generator loss's (t_min, t_max), which the iteration draws its noise levels from.
  """
  fake: Callable
  generator: Callable
  t_range: Tuple[float, float]


def make_step_grads(nets: DistillNetworks, config, mesh, specs: Dict[str, object]) -> StepGrads:
  """The loss/gradient functions under config.perf (compute dtype, remat, fused teacher/fake calls)."""
  opts = perf_lib.resolve(config)
  # Rematerialisation is for the generator step, where three networks' activations meet; the DSM
  # step holds one network's.
  fake_nets = perf_lib.configure_networks(nets, opts, remat=False)
  gen_nets = perf_lib.configure_networks(nets, opts)
  if opts.fuse_teacher_fake:
    perf_lib.check_fusable(gen_nets)
  data_dim = math.prod(nets.data_shape)
  loss_def = generator_losses.get_generator_loss(config.loss, data_dim)
  adversarial_weight, discriminator_weight = adversarial.settings(config)
  discriminate = check_discriminator(config, data_dim, nets)
  consts_specs = {k: v for k, v in specs["consts"].items() if k != REAL}
  # SiD's loss scaling (--lsg 100, --ls 1): gradients reach Adam multiplied by these; losses and gradient
  # norms are reported unscaled.
  gen_scale, fake_scale = loss_scales(config)
  guidance_weight = guidance.weight_of(config)
  if guidance_weight != 1.0 and opts.fuse_teacher_fake:
    raise UserError("teacher.guidance != 1 with perf.fuse_teacher_fake: set --config.perf.fuse_teacher_fake=False.")
  augment_p = fake_augment_probability(config, nets)
  regression_weight, _ = regression.settings(config)

  sigma_data = float(config.sigma_data)
  fake_on_grid = fake_noise_on_grid(config, nets)
  logvar_on = check_logvar_weighting(config, nets)

  def fake_local(gen_params, fake_params, consts, z, cond, sigma, eps, rng, real, adversarial_on):
    del adversarial_on
    consts = mesh_lib.gather_params(consts, consts_specs)
    gen_full = mesh_lib.gather_params(gen_params, specs["generator"])
    rng = jax.random.fold_in(rng, device_index(mesh))
    # The generator is in eval mode here (no dropout), as in SiD's fake-score update.
    x_g = jax.lax.stop_gradient(fake_nets.generate(gen_full, consts["generator"], z, cond))

    augment_labels = real_augment_labels = None
    if augment_p > 0:
      # EDM's augmentation pipe on the fake score's DSM, as SiD trains it (--augment 0.12): the network is
      # conditioned on the augmentation labels, the DSM target is the augmented sample.
      x_g, augment_labels = augment_lib.augment(jax.random.fold_in(rng, 2), x_g, augment_p)
      if discriminate:  # SiDA augments the real batch too, with its own draw
        real = dict(real)
        real["x"], real_augment_labels = augment_lib.augment(jax.random.fold_in(rng, 3), real["x"], augment_p)
    s = edm.expand_to(sigma, x_g)

    def loss_fn(fp_local):
      fp = mesh_lib.gather_params(fp_local, specs["fake"])
      def fake(x, c, labels, k):
        return fake_nets.fake.apply(fp, consts["fake"], x, sigma, c, augment_labels=labels, train=True,
                                    rng=jax.random.fold_in(rng, k), return_logits=discriminate)
      out = fake(x_g + s * eps, cond, augment_labels, 1)
      denoised, logits_fake = out if discriminate else (out, None)
      per_sample = (dsm.epsilon_loss(denoised, x_g, sigma) if fake_on_grid else
                    dsm.edm_dsm_loss(denoised, x_g, sigma, sigma_data))
      dsm_loss = jnp.mean(per_sample)
      metrics, total, sample_weight = {}, dsm_loss, None
      if logvar_on:
        # SiD's --return_logvar: the DSM as EDM2 trains it, with the fake score's own uncertainty u(sigma).
        u = fake_nets.fake.logvar(fp, sigma)
        total = jnp.mean(dsm.uncertainty_weighted(per_sample, u, data_dim))
        metrics["fake_logvar"] = jnp.mean(u)
        sample_weight = jnp.exp(-u)
      if discriminate:
        # SiDA: the real rows get the same noise levels and noise as the generated ones.
        _, logits_real = fake(real["x"] + s * eps, real.get("cond"), real_augment_labels, 4)
        metrics["disc_loss"] = adversarial.discriminator_loss(logits_real, logits_fake, sigma, sigma_data,
                                                              sample_weight)
        total = total + discriminator_weight * metrics["disc_loss"]
      return fake_scale * total, (dsm_loss, metrics)

    (_, (loss, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(fake_params)
    return (jax.lax.pmean(loss, mesh_lib.BATCH_AXES), average_grads(grads, specs["fake"], mesh),
            jax.lax.pmean(metrics, mesh_lib.BATCH_AXES))

  def gen_local(gen_params, fake_params, consts, z, cond, sigma, eps, rng, real, adversarial_on):
    del real
    consts = mesh_lib.gather_params(consts, consts_specs)
    fake_full = mesh_lib.gather_params(fake_params, specs["fake"])
    rng = jax.random.fold_in(rng, device_index(mesh))
    generate = perf_lib.maybe_remat(
        lambda p: gen_nets.generate(p, consts["generator"], z, cond, train=True, rng=rng), opts.remat["generator"])
    pair = None
    if opts.fuse_teacher_fake:
      pair = lambda tp, fp, x, s: perf_lib.paired_denoise(gen_nets.teacher.module, tp, {**consts["fake"], "params": fp},
                                                          x, s, cond)
    teacher_guided = guidance.guided_teacher(gen_nets.teacher, guidance_weight, consts.get(NULL_COND))
    teacher_denoise, fake_denoise, denoise_pair = perf_lib.generator_step_denoisers(
        # The teacher, classifier-free guided where config.teacher.guidance != 1 (teachers/guidance.py).
        lambda p, x, s: teacher_guided(p, x, s, cond),
        # Fake score frozen (no dropout) inside the generator step; stop-gradient on its params (in the loss).
        lambda p, x, s: gen_nets.fake.apply(p, consts["fake"], x, s, cond, return_logits=discriminate),
        pair, opts)

    # SiD's --return_logvar: each sample's loss divided by e^u, u(sigma) the (frozen) fake score's uncertainty.
    # (generator_loss stops its gradient.)
    sample_weight = jnp.exp(-gen_nets.fake.logvar(fake_full, sigma)) if logvar_on else None

    def loss_fn(gp_local):
      gp = mesh_lib.gather_params(gp_local, specs["generator"])
      loss, aux = generator_losses.generator_loss(
          gp, fake_full, consts["teacher"], generate=generate, teacher_denoise=teacher_denoise,
          fake_denoise=fake_denoise, denoise_pair=denoise_pair, eps=eps, sigma=sigma,
          per_sample_loss=loss_def.per_sample,
          normalize=bool(config.loss.normalize), normalize_floor=float(config.loss.normalize_floor),
          needs_ratio=loss_def.needs_ratio, sample_weight=sample_weight)
      metrics = {}
      if adversarial_weight:
        # SiDA's generator term on the same x_t, through the fake score's (frozen) encoder logits.
        metrics["adv_loss"] = adversarial.generator_loss(aux["logits"], aux["weight"], data_dim)
        loss = loss + adversarial_weight * adversarial_on * metrics["adv_loss"]
      if regression_weight:
        # DMD's regression term on this device's share of the pairs (its own draw, folded with the device).
        reg = regression.loss(
            lambda z_, c_: gen_nets.generate(gp, consts["generator"], z_, c_, train=True, rng=jax.random.fold_in(rng, 5)),
            consts["regression"], jax.random.fold_in(rng, 6), z.shape[0])
        loss = loss + regression_weight * reg
      return gen_scale * loss, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(gen_params)
    return (jax.lax.pmean(loss, mesh_lib.BATCH_AXES) / gen_scale, average_grads(grads, specs["generator"], mesh),
            jax.lax.pmean(metrics, mesh_lib.BATCH_AXES))

  def sharded(fn, out_params_spec):
    def call(gen_params, fake_params, consts, z, cond, sigma, eps, rng, real=None, adversarial_on=1.0):
      """adversarial_on: 1 or 0 (a traced scalar), whether the adversarial term enters the generator loss
      yet (SiDA's image-count schedule); its metric is reported either way."""
      if discriminate and real is None and fn is fake_local:
        raise ValueError("the discriminator's fake-score step needs a batch of real samples (real=...).")
      consts = {k: v for k, v in consts.items() if k != REAL}
      in_specs = (specs["generator"], specs["fake"], consts_specs, mesh_lib.batch_specs(z), mesh_lib.batch_specs(cond),
                  mesh_lib.batch_spec(1), mesh_lib.batch_spec(z.ndim), P(), mesh_lib.batch_specs(real), P())
      mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=(P(), out_params_spec, P()), check_vma=False)
      return mapped(gen_params, fake_params, consts, z, cond, constrain_batch(sigma, mesh),
                    constrain_batch(eps, mesh), rng, real, jnp.asarray(adversarial_on, jnp.float32))
    return call

  return StepGrads(fake=sharded(fake_local, specs["fake"]), generator=sharded(gen_local, specs["generator"]),
                   t_range=loss_def.t_range)


def fake_noise_on_grid(config, nets: DistillNetworks) -> bool:
  """config.fake_noise: 'lognormal' (EDM's P_mean / P_std draw and loss weight) or 'grid' (a discrete
  teacher's own training: uniform trained timesteps, the epsilon loss); 'auto': 'grid' where the teacher
  has a grid (nets.sigma_grid)."""
  kind = str(config.fake_noise)
  if kind not in ("auto", "lognormal", "grid"):
    raise UserError(f"fake_noise={kind!r}; use 'auto', 'lognormal' or 'grid'.")
  if kind == "grid" and nets.sigma_grid is None:
    raise UserError("fake_noise='grid' needs a discrete-time teacher (trained timesteps); set --config.fake_noise=lognormal.")
  return kind == "grid" or (kind == "auto" and nets.sigma_grid is not None)


def fake_augment_probability(config, nets: DistillNetworks) -> float:
  """config.fake_augment_p where the fake score takes EDM's 9 augmentation labels, else 0 (nothing to condition)."""
  p = float(config.fake_augment_p or 0.0)
  if not 0.0 <= p <= 1.0:
    raise UserError(f"fake_augment_p must lie in [0, 1], got {p}; set --config.fake_augment_p (EDM/SiD: 0.12).")
  dim = nets.fake.augment_dim if nets.fake is not None else 0
  if p and dim and dim != augment_lib.augment_label_dim():
    raise UserError(f"fake_augment_p={p} needs a fake score with EDM's {augment_lib.augment_label_dim()} augmentation "
                     f"labels, but it takes {dim}; set --config.fake_augment_p=0.")
  return p if dim else 0.0


def loss_scales(config):
  """(generator, fake) loss scales: config.loss.generator_scale / fake_scale."""
  scales = tuple(float(config.loss[name]) for name in ("generator_scale", "fake_scale"))
  for name, value in zip(("generator_scale", "fake_scale"), scales):
    if not 0 < value < float("inf"):
      raise UserError(f"loss.{name} must be a finite value > 0, got {value}; set --config.loss.{name}.")
  return scales


def make_sim_iteration(nets: DistillNetworks, config, mesh, specs: Dict[str, object], optimizers: Dict[str, Callable],
                       *, with_generator: bool = True):
  """Builds iteration(state, consts). specs: PartitionSpecs of 'generator', 'fake' params and 'consts'.

  consts = {'teacher': teacher variables, 'generator': generator extras, 'fake': fake-score extras} and,
  for text-conditioned runs, 'cond_pool': the encoded prompts the generator's conditions are drawn from;
  with the discriminator, REAL: the real samples (and labels) it is shown.
  """
  batch = int(config.batch_size)
  mesh_lib.check_batch_divisible(batch, mesh)
  base_key = jax.random.key(int(config.seed))
  fake_steps = int(config.fake_steps_per_iteration)
  step_grads = make_step_grads(nets, config, mesh, specs)
  gen_scale, fake_scale = loss_scales(config)
  t_min, t_max = step_grads.t_range
  discriminate = discriminator_needed(config, math.prod(nets.data_shape))
  adversarial_on = adversarial.settings(config)[0] > 0
  adversarial_start = adversarial.start_images(config)
  fake_on_grid = fake_noise_on_grid(config, nets)

  def iteration(state: state_lib.TrainState, consts):
    key = jax.random.fold_in(base_key, state.step)
    params, opt_state = dict(state.params), dict(state.opt_state)
    metrics = {}
    fake_losses, fake_norms, fake_extras = [], [], []
    for j in range(fake_steps):
      k = jax.random.fold_in(key, j)
      k_noise, k_sigma, k_rng = jax.random.split(k, 3)
      z, cond = draw_generator_noise(k_noise, batch, nets, mesh, consts.get("cond_pool"))
      real = None
      if discriminate:
        real = draw_real(jax.random.fold_in(k, 7), consts[REAL], batch, mesh)
        if real.get("cond") is not None:
          cond = real["cond"]  # SiDA generates the fake step's batch with the real batch's labels
      if fake_on_grid:  # the fake score learns as its discrete teacher did
        sigma, eps = dsm.draw_grid_noise(k_sigma, z.shape, nets.sigma_grid)
      else:
        sigma, eps = dsm.draw_dsm_noise(k_sigma, z.shape, float(config.fake_p_mean), float(config.fake_p_std))
      loss, grads, fake_metrics = step_grads.fake(params["generator"], params["fake"], consts, z, cond, sigma, eps,
                                                  k_rng, real)
      loss = inject_nonfinite(loss, state.step, config)
      params["fake"], opt_state["fake"] = state_lib.apply_optimizer(optimizers["fake"], params["fake"],
                                                                    opt_state["fake"], grads)
      fake_losses.append(loss)
      fake_norms.append(state_lib.global_norm(grads) / fake_scale)
      fake_extras.append(fake_metrics)  # disc_loss, fake_logvar where they are computed
    metrics["fake_loss"] = jnp.mean(jnp.stack(fake_losses))
    metrics["fake_grad_norm"] = jnp.mean(jnp.stack(fake_norms))
    for name in fake_extras[0]:
      metrics[name] = jnp.mean(jnp.stack([m[name] for m in fake_extras]))
    ema = dict(state.ema)
    if with_generator:
      k = jax.random.fold_in(key, fake_steps)
      k_noise, k_sigma, k_eps, k_rng = jax.random.split(k, 4)
      z, cond = draw_generator_noise(k_noise, batch, nets, mesh, consts.get("cond_pool"))
      sigma = edm.sample_sigma_karras_uniform(k_sigma, (batch,), t_max, float(config.sigma_min),
                                             float(config.sigma_max), float(config.rho), t_min=t_min)
      sigma = nets.snap_sigma(sigma)
      eps = draws.normal(k_eps, z.shape, jnp.float32)
      # SiDA adds its adversarial term once adversarial.start_images images have been drawn.
      started = (state.step.astype(jnp.float32) * batch >= adversarial_start).astype(jnp.float32)
      loss, grads, gen_metrics = step_grads.generator(params["generator"], params["fake"], consts, z, cond, sigma,
                                                      eps, k_rng, None, started)
      metrics.update(gen_metrics)
      params["generator"], opt_state["generator"] = state_lib.apply_optimizer(
          optimizers["generator"], params["generator"], opt_state["generator"], grads)
      decay = state_lib.ema_decay(state.step, batch, float(config.ema_half_life_images), config.ema_rampup_ratio)
      ema["generator"] = state_lib.ema_update(ema["generator"], params["generator"], decay)
      metrics.update(gen_loss=loss, gen_grad_norm=state_lib.global_norm(grads) / gen_scale, ema_decay=decay)
    else:
      zero = jnp.zeros((), jnp.float32)
      metrics.update(gen_loss=zero, gen_grad_norm=zero, ema_decay=zero)
      if adversarial_on:
        metrics["adv_loss"] = zero
    candidate = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
    ok = state_lib.all_finite([metrics[k] for k in ("fake_loss", "fake_grad_norm", "gen_loss", "gen_grad_norm")])
    new = state_lib.guarded(state, candidate, ok)
    metrics.update(step_ok=ok.astype(jnp.int32), nonfinite_total=new.nonfinite["total"],
                   nonfinite_streak=new.nonfinite["streak"])
    return new, metrics

  return iteration


def inject_nonfinite(loss, step, config):
  """Test hook: turns the loss NaN at the configured steps (`debug.nan_steps`); free when unused."""
  steps = tuple(config.debug.nan_steps or ())
  if not steps:
    return loss
  hit = jnp.any(step == jnp.asarray(steps, jnp.int32))
  return jnp.where(hit, jnp.nan, loss)
